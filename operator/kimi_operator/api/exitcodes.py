"""Exit codes of the workload commands, shared by the pods that exit and the operator that reads them.

Codes at or above PERMANENT are failures a retry cannot fix: the Job's pod failure policy fails the
Job at once, and the operator reports Stalled with the reason. Anything else is retried.
"""

from __future__ import annotations

import enum

PERMANENT = 10


class PrepareExit(enum.IntEnum):
    INVALID_CHECKPOINT = 10
    INSUFFICIENT_DISK = 11
    BAD_TOKEN = 12
    UNKNOWN_REVISION = 13
    CORRUPT_FILE = 14
    UNSUPPORTED_NODE = 15
    CONVERTER_UNAVAILABLE = 16
    REPO_NOT_FOUND = 17

    @property
    def reason(self) -> str:
        """The condition reason the operator reports for this exit."""
        return {
            PrepareExit.INVALID_CHECKPOINT: "InvalidCheckpoint",
            PrepareExit.INSUFFICIENT_DISK: "InsufficientDisk",
            PrepareExit.BAD_TOKEN: "BadToken",
            PrepareExit.UNKNOWN_REVISION: "UnknownRevision",
            PrepareExit.CORRUPT_FILE: "CorruptFile",
            PrepareExit.UNSUPPORTED_NODE: "UnsupportedNode",
            PrepareExit.CONVERTER_UNAVAILABLE: "ConverterUnavailable",
            PrepareExit.REPO_NOT_FOUND: "RepoNotFound",
        }[self]


class TrainExit(enum.IntEnum):
    INVALID_DATASET = 20
    INVALID_CONFIG = 21
    MISSING_WEIGHTS = 22
    EXPORT_FAILED = 23

    @property
    def reason(self) -> str:
        return {
            TrainExit.INVALID_DATASET: "InvalidDataset",
            TrainExit.INVALID_CONFIG: "InvalidTrainingConfig",
            TrainExit.MISSING_WEIGHTS: "MissingWeights",
            TrainExit.EXPORT_FAILED: "AdapterExportFailed",
        }[self]


# SIGKILL: the kernel's OOM killer (or the kubelet) ended the container.
OOM_EXIT = 137
