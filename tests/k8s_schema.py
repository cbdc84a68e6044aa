"""What a Kubernetes API server checks of a new custom object, without one: the CRD's structural OpenAPI v3 schema
with unknown fields rejected (as `kubectl apply --validate=strict`, except where the schema preserves them) and its
`x-kubernetes-validations` CEL rules that apply to a new object (`cel-python`; rules on `oldSelf` are for updates).
Built-in kinds (a ConfigMap) go through the `kubernetes` client's own models."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import kubernetes.client
import yaml

K8S = Path(__file__).resolve().parent.parent.parent / "shared" / "k8s"
CRDS = {"TrainJob": "trainer.kubeflow.org_trainjobs.yaml", "JobSet": "jobset.x-k8s.io_jobsets.yaml"}
_INT32 = (-(2**31), 2**31 - 1)


@cache
def _crd(kind: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / CRDS[kind]).read_text())


@cache
def _rule(text: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(text))


def _type_errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, (int, str)) and not isinstance(value, bool) else [f"{path}: not an int or string"]
    kind = schema.get("type")
    ok = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
          "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
          "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(kind)
    if ok is not None and not ok(value):
        return [f"{path}: {value!r} is not of type {kind}"]
    if "anyOf" in schema and not any(not _type_errors(value, option, path) for option in schema["anyOf"]):
        return [f"{path}: {value!r} matches none of its types"]
    return []


def errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Everything the schema refuses in `value`, each with its path."""
    found = _type_errors(value, schema, path)
    if found:
        return found
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                found += errors(item, properties[name], f"{path}.{name}")
            elif isinstance(extra, dict):
                found += errors(item, extra, f"{path}.{name}")
            elif not (extra is True or schema.get("x-kubernetes-preserve-unknown-fields")):
                found.append(f"{path}.{name}: unknown field")
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            found.append(f"{path}: more than {schema['maxItems']} items")
        if "minItems" in schema and len(value) < schema["minItems"]:
            found.append(f"{path}: fewer than {schema['minItems']} items")
        found += [error for i, item in enumerate(value) for error in errors(item, schema.get("items", {}), f"{path}[{i}]")]
    elif isinstance(value, str):
        if "enum" in schema and value not in schema["enum"]:
            found.append(f"{path}: {value!r} is not one of {schema['enum']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{path}: longer than {schema['maxLength']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            found.append(f"{path}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{path}: {value!r} does not match {schema['pattern']}")
    elif isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{path}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{path}: above {schema['maximum']}")
        if schema.get("format") == "int32" and not _INT32[0] <= value <= _INT32[1]:
            found.append(f"{path}: not an int32")
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        if not _rule(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}):
            found.append(f"{path}: {rule.get('message') or rule['rule']}")
    return found


def validate(document: dict[str, Any]) -> list[str]:
    """What an API server refuses of this new object (an empty list: it would be created)."""
    kind = document.get("kind")
    if kind in CRDS:
        crd = _crd(kind)
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        expected = f"{crd['spec']['group']}/{version['name']}"
        if document.get("apiVersion") != expected:
            return [f"apiVersion: {document.get('apiVersion')!r}, not {expected!r}"]
        schema = version["schema"]["openAPIV3Schema"]
        body = {key: value for key, value in document.items() if key != "metadata"}  # ObjectMeta: checked below
        structure = {key: value for key, value in schema.items() if key != "x-kubernetes-validations"}
        return errors(body, structure) + _root_rules(document, schema) + _metadata_errors(document)
    model = getattr(kubernetes.client, f"V1{kind}")
    return _model_errors(document, model.__name__) + _metadata_errors(document)


def _root_rules(document: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The object's own rules read its metadata (a name's form and length), which `errors` left out."""
    return [f": {rule.get('message') or rule['rule']}" for rule in schema.get("x-kubernetes-validations", [])
            if "oldSelf" not in rule["rule"] and not _rule(rule["rule"]).evaluate({"self": celpy.json_to_cel(document)})]


def _metadata_errors(document: dict[str, Any]) -> list[str]:
    return _model_errors(document.get("metadata", {}), "V1ObjectMeta", ".metadata")


def _model_errors(value: dict[str, Any], model: str, path: str = "") -> list[str]:
    """The client's model of a built-in kind: what it drops was unknown, what it cannot read is mistyped."""
    client = kubernetes.client.ApiClient()
    try:
        parsed = client._ApiClient__deserialize(value, model)  # the client's own reader of a response body
    except (TypeError, ValueError) as exc:
        return [f"{path}: {exc}"]
    kept = client.sanitize_for_serialization(parsed)
    return [] if kept == value else [f"{path}: not a {model} as written (unknown or mistyped fields): {value}"]
