"""Exit codes of the workload commands, shared by the pods that exit and the operator that reads them.

Codes at or above PERMANENT are failures a retry cannot fix: the Job's pod failure policy fails the
Job at once, and the operator reports Stalled with the reason. Anything else is retried.
"""

from __future__ import annotations

import enum

PERMANENT = 10


# The condition reason the operator reports for each exit: one table for every workload.
_REASONS = {
    10: "InvalidCheckpoint",
    11: "InsufficientDisk",
    12: "BadToken",
    13: "UnknownRevision",
    14: "CorruptFile",
    15: "UnsupportedNode",
    16: "ConverterUnavailable",
    17: "RepoNotFound",
    18: "QuantizationNotFound",
    20: "InvalidDataset",
    21: "InvalidTrainingConfig",
    22: "MissingWeights",
    23: "AdapterExportFailed",
}


class WorkloadExit(enum.IntEnum):
    """A permanent failure of a workload command; ``reason`` is what the operator reports."""

    @property
    def reason(self) -> str:
        return _REASONS[int(self)]


class PrepareExit(WorkloadExit):
    INVALID_CHECKPOINT = 10
    INSUFFICIENT_DISK = 11
    BAD_TOKEN = 12
    UNKNOWN_REVISION = 13
    CORRUPT_FILE = 14
    UNSUPPORTED_NODE = 15
    CONVERTER_UNAVAILABLE = 16
    REPO_NOT_FOUND = 17
    QUANTIZATION_NOT_FOUND = 18


class TrainExit(WorkloadExit):
    INVALID_DATASET = 20
    INVALID_CONFIG = 21
    MISSING_WEIGHTS = 22
    EXPORT_FAILED = 23


# SIGKILL: the kernel's OOM killer (or the kubelet) ended the container.
OOM_EXIT = 137
