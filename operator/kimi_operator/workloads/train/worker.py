"""One training process of several (``accelerate launch`` runs it once per GPU): LLaMA-Factory on
the arguments the training pod's command prepared. A refusal is written where that command reads it.

    python -m kimi_operator.workloads.train.worker ARGS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kimi_operator.api.exitcodes import TrainExit
from kimi_operator.workloads.termination import WorkloadError
from kimi_operator.workloads.train import trainer


def main(argv: list[str]) -> int:
    args_file = Path(argv[0])
    try:
        trainer.run(json.loads(args_file.read_text()))
    except WorkloadError as exc:
        trainer.refuse(args_file, str(exc))
        return int(TrainExit.INVALID_CONFIG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
