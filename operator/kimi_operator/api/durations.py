"""Durations as the trainer writes them and ``status.progress.eta`` carries them: ``str(timedelta)``."""

from __future__ import annotations


def seconds(duration: str) -> int | None:
    """LLaMA-Factory's durations (``str(timedelta)``: ``H:MM:SS`` or ``N day(s), H:MM:SS``) in seconds."""
    days, _, clock = duration.rpartition(", ")
    parts = clock.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    hours, minutes, secs = (int(p) for p in parts)
    total = hours * 3600 + minutes * 60 + secs
    if days:
        count = days.split()[0]
        if not count.isdigit():
            return None
        total += int(count) * 86400
    return total
