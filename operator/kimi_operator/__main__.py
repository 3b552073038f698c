from kimi_operator.cli import main

raise SystemExit(main())
