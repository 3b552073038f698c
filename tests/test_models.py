import pytest
from pydantic import ValidationError

from kimi_operator.api.finetunejob import FineTuneJobSpec
from kimi_operator.api.kimimodel import KimiModelSpec
from kimi_operator.api.loraserver import LoraServerSpec

KM = {
    "source": {"huggingFace": {"repo": "moonshotai/Kimi-K2.5", "revision": "main"}},
    "placement": {"nodeNames": ["a", "b"], "count": 2},
    "storage": {"hostPath": "/mnt/nvme/kimi"},
}
FTJ = {"model": {"name": "kimi"}, "dataset": {"configMap": {"name": "data", "key": "train.jsonl"}}}
LSRV = {"model": {"name": "kimi"}, "adapters": [{"name": "a1", "fineTuneJob": {"name": "ftj"}}]}


def test_fine_tune_defaults_follow_the_guide() -> None:
    spec = FineTuneJobSpec.model_validate(FTJ)
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout) == (16, 32, 0.1)
    assert spec.training.learning_rate == 2e-5
    assert spec.training.epochs == 3
    assert (spec.training.per_device_batch_size, spec.training.gradient_accumulation_steps) == (1, 16)


def test_wire_form_is_camel_case_without_unset_optionals() -> None:
    wire = KimiModelSpec.model_validate(KM).to_wire()
    assert wire["source"] == {"huggingFace": {"repo": "moonshotai/Kimi-K2.5", "revision": "main"}}
    assert wire["storage"] == {"hostPath": "/mnt/nvme/kimi", "reclaimPolicy": "Retain"}
    assert wire["resources"]["downloadConcurrency"] == 8


@pytest.mark.parametrize(
    ("model", "base", "path", "value", "where"),
    [
        (KimiModelSpec, KM, ("storage", "hostPath"), "relative/path", "storage.hostPath"),
        (KimiModelSpec, KM, ("placement", "count"), 0, "placement.count"),
        (KimiModelSpec, KM, ("resources",), {"memory": "lots"}, "resources.memory"),
        (KimiModelSpec, KM, ("variants",), ["fp32"], "variants.0"),
        (FineTuneJobSpec, FTJ, ("lora",), {"rank": 0}, "lora.rank"),
        (FineTuneJobSpec, FTJ, ("lora",), {"dropout": 1.0}, "lora.dropout"),
        (FineTuneJobSpec, FTJ, ("training",), {"learningRate": -1}, "training.learningRate"),
        (LoraServerSpec, LSRV, ("engine",), {"ktMethod": "INT2"}, "engine.ktMethod"),
        (LoraServerSpec, LSRV, ("adapters",), [{"name": "a:b", "path": "/x"}], "adapters.0.name"),
    ],
)
def test_invalid_values_name_the_field(
    model: type, base: dict, path: tuple[str, ...], value: object, where: str
) -> None:
    doc = {**base}
    cursor = doc
    for key in path[:-1]:
        cursor[key] = dict(cursor[key])
        cursor = cursor[key]
    cursor[path[-1]] = value
    with pytest.raises(ValidationError) as info:
        model.model_validate(doc)
    locations = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert where in locations


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="cpu_infer"):
        FineTuneJobSpec.model_validate({**FTJ, "training": {"cpu_infer": 32}})


@pytest.mark.parametrize("quantity", ["64Gi", "500m", "1.5", "8", 8, "1e3", "2Ti"])
def test_quantities_accepted(quantity: object) -> None:
    KimiModelSpec.model_validate({**KM, "resources": {"memory": quantity}})


@pytest.mark.parametrize("quantity", ["64 GiB", "Gi", "-1", -1, "1.2.3"])
def test_quantities_refused(quantity: object) -> None:
    with pytest.raises(ValidationError):
        KimiModelSpec.model_validate({**KM, "resources": {"memory": quantity}})
