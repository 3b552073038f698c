from collections.abc import Iterator
from typing import Any

import pytest

from kimi_operator.api.crd import all_crds, crd
from kimi_operator.api.kinds import FINE_TUNE_JOB, KIMI_MODEL, KINDS, LORA_SERVER

_STRUCTURAL_FORBIDDEN = {"$ref", "$defs", "const", "title", "oneOf", "allOf", "not"}


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def root(kind: Any) -> dict[str, Any]:
    schema: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: Any) -> None:
    for path, node in walk(root(kind)):
        assert not (_STRUCTURAL_FORBIDDEN & node.keys()), path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "anyOf" not in node, path
        assert "type" in node, path
        if node["type"] == "object" and path != ".metadata":
            assert "properties" in node or "additionalProperties" in node, path
            assert not ("properties" in node and "additionalProperties" in node), path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}: OpenAPI v3.0 wants a boolean {bound}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_spec_and_status_field_is_described(kind: Any) -> None:
    undocumented = [
        path
        for path, node in walk(root(kind))
        if path.startswith((".spec", ".status"))
        and not path.endswith("[]")
        and not node.get("description")
        # Free-form maps (labels) describe themselves at the map.
        and not path.endswith("{}")
    ]
    assert undocumented == []


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_crd_shape(kind: Any) -> None:
    doc = crd(kind)
    names = doc["spec"]["names"]
    assert doc["spec"]["group"] == "kimi-operator.io"
    assert doc["spec"]["scope"] == "Namespaced"
    assert names["shortNames"] == list(kind.short_names)
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    assert columns[-1]["name"] == "Age"
    # Columns show real state: never a "last condition" column.
    assert not [c for c in columns if "conditions" in c["jsonPath"]]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions"} <= status.keys()
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_cel_rules_are_where_the_schema_cannot_speak() -> None:
    km = root(KIMI_MODEL)["properties"]["spec"]["properties"]
    assert "self == oldSelf" in rules(km["source"])
    assert "self == oldSelf" in rules(km["source"]["properties"]["huggingFace"]["properties"]["revision"])
    assert any("exists_one" in r for r in rules(km["source"]))
    assert any("exists_one" in r for r in rules(km["placement"]))

    ftj = root(FINE_TUNE_JOB)["properties"]["spec"]["properties"]
    assert any("exists_one" in r for r in rules(ftj["dataset"]))
    assert ftj["lora"]["properties"]["rank"]["minimum"] == 1
    assert ftj["lora"]["properties"]["alpha"]["minimum"] == 1

    lsrv_spec = root(LORA_SERVER)["properties"]["spec"]
    assert any("servedModelName" in r for r in rules(lsrv_spec))
    adapters = lsrv_spec["properties"]["adapters"]
    assert adapters["x-kubernetes-list-type"] == "map"
    assert adapters["x-kubernetes-list-map-keys"] == ["name"]
    assert any("exists_one" in r for r in rules(adapters["items"]))


def test_defaults_are_applied_by_the_apiserver() -> None:
    ftj = root(FINE_TUNE_JOB)["properties"]["spec"]["properties"]
    # Whole-object defaults carry every nested default so CEL rules on them can be checked.
    assert ftj["lora"]["default"] == {
        "rank": 16,
        "alpha": 32,
        "dropout": 0.1,
        "targetModules": ["all"],
        "experts": False,
    }
    assert ftj["training"]["default"]["learningRate"] == 2e-5


def test_all_crds_in_order() -> None:
    assert [c["spec"]["names"]["kind"] for c in all_crds()] == ["KimiModel", "FineTuneJob", "LoraServer"]
