"""Offline, strict validation of custom resources against the upstream CRD schemas in ../shared/crds.

`validate(obj)` picks the schema by apiVersion and kind (the served version's openAPIV3Schema; for
Katib, whose CRDs carry no schema, the OpenAPI document katib-v1beta1.openapi.json) and checks it as
an API server with strict field validation would: an unknown field is an error, as is a wrong type.
`metadata` is checked for the basics (name or generateName, DNS names, label keys and values).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parents[1].parent / "shared" / "crds"
KATIB_OPENAPI = CRDS / "katib-v1beta1.openapi.json"

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
METADATA = {
    "type": "object",
    "additionalProperties": False,
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": rf"^{_DNS_LABEL}$"},
        "labels": {
            "type": "object",
            "propertyNames": {"pattern": rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_LABEL_NAME}$"},
            "additionalProperties": {"type": "string", "pattern": rf"^({_LABEL_NAME})?$"},
        },
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


class CRDValidationError(ValueError):
    """A custom resource that the API server would refuse; the message names the JSON path."""


def _strict(s):
    """A copy of an OpenAPI v3 (CRD) schema as JSON Schema that refuses unknown fields."""
    if isinstance(s, list):
        return [_strict(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k in ("properties", "patternProperties", "schemas"):  # maps of name -> schema
            out[k] = {name: _strict(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf", "components"):
            out[k] = _strict(v)
        else:
            out[k] = v
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def _index() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> raw root schema, for every served version of every CRD in CRDS."""
    katib = json.loads(KATIB_OPENAPI.read_text())["components"]["schemas"]
    index = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        spec = crd["spec"]
        for version in spec["versions"]:
            root = version.get("schema", {}).get("openAPIV3Schema")
            if not version.get("served") or root is None:
                continue
            if "properties" not in root:  # Katib: schema-less CRD, use the OpenAPI document
                name = next((n for n in katib if n.lstrip(".") == f"{version['name']}.{spec['names']['kind']}"), None)
                root = {**katib[name], "components": {"schemas": katib}} if name else root
            index[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = root
    return index


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    try:
        raw = _index()[(api_version, kind)]
    except KeyError:
        known = ", ".join(f"{k} ({v})" for v, k in sorted(_index()))
        raise CRDValidationError(f"no CRD schema for apiVersion {api_version!r} kind {kind!r} in {CRDS}; "
                                 f"known: {known}") from None
    schema = _strict(raw)
    schema["properties"] = {**schema["properties"], "metadata": METADATA}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    return jsonschema.Draft202012Validator(schema)


def _path(parts) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if p.isidentifier() else f"[{p!r}]"
                         for p in parts)


def _messages(error: jsonschema.ValidationError) -> list[str]:
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = set(error.schema.get("properties", {}))
        return [f"{_path([*error.absolute_path, f])}: unknown field" for f in error.instance if f not in known]
    return [f"{_path(error.absolute_path)}: {error.message}"]


def validate(obj: dict) -> None:
    """Raise CRDValidationError unless `obj` is a valid custom resource of a kind in CRDS."""
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        raise CRDValidationError(f"not a Kubernetes object (apiVersion and kind needed): {str(obj)[:80]}")
    validator = _validator(obj["apiVersion"], obj["kind"])
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        name = (obj.get("metadata") or {}).get("name")
        lines = [m for e in errors for m in _messages(e)]
        raise CRDValidationError(f"{obj['kind']} {name!r} is invalid:\n  " + "\n  ".join(lines[:20]))
