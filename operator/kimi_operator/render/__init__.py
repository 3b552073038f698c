"""Pure functions from a validated spec and observed facts to manifest dicts. No I/O."""
