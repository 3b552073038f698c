"""The registry of the operator's kinds: one place that ties names, models, columns and rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kimi_operator.api import finetunejob, kimimodel, loraserver
from kimi_operator.api.base import GROUP, VERSION, ApiModel
from kimi_operator.api.common_status import BaseStatus

# Object names become Job, Service and label values, which are limited to 63 characters. A CRD
# may restrict metadata.name in its schema (name and generateName only).
MAX_NAME = 63


@dataclasses.dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[ApiModel]
    status: type[BaseStatus]
    description: str
    printer_columns: Sequence[Mapping[str, Any]]

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def api_version(self) -> str:
        return f"{GROUP}/{VERSION}"


KIMI_MODEL = Kind(
    kind=kimimodel.KIND,
    plural=kimimodel.PLURAL,
    short_names=kimimodel.SHORT_NAMES,
    spec=kimimodel.KimiModelSpec,
    status=kimimodel.KimiModelStatus,
    description=(
        "A Kimi K2.5 checkpoint prepared on node-local storage of chosen nodes: downloaded at a pinned "
        "revision, verified, and converted to BF16 (training) and kt-kernel CPU expert weights (serving)."
    ),
    printer_columns=kimimodel.PRINTER_COLUMNS,
)
FINE_TUNE_JOB = Kind(
    kind=finetunejob.KIND,
    plural=finetunejob.PLURAL,
    short_names=finetunejob.SHORT_NAMES,
    spec=finetunejob.FineTuneJobSpec,
    status=finetunejob.FineTuneJobStatus,
    description=(
        "A LoRA SFT run of a KimiModel on a validated chat dataset with LLaMA-Factory and KTransformers, "
        "pinned to a node holding the BF16 weights, with live progress, resume, and an adapter exported for SGLang."
    ),
    printer_columns=finetunejob.PRINTER_COLUMNS,
)
LORA_SERVER = Kind(
    kind=loraserver.KIND,
    plural=loraserver.PLURAL,
    short_names=loraserver.SHORT_NAMES,
    spec=loraserver.LoraServerSpec,
    status=loraserver.LoraServerStatus,
    description=(
        "SGLang + kt-kernel replicas of a KimiModel serving LoRA adapters loaded at run time, behind an "
        "OpenAI-compatible router that sends each request to a replica holding its adapter."
    ),
    printer_columns=loraserver.PRINTER_COLUMNS,
)

KINDS: tuple[Kind, ...] = (KIMI_MODEL, FINE_TUNE_JOB, LORA_SERVER)


def by_kind(kind: str) -> Kind:
    for k in KINDS:
        if k.kind == kind:
            return k
    raise KeyError(kind)
