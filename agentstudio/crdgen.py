"""CustomResourceDefinitions generated from the pydantic resource models (`agent-studio crds`).

Pydantic's JSON Schema is turned into a Kubernetes structural schema: references inlined, optional
`anyOf [X, null]` collapsed to X, titles dropped, `const` turned into a one-value enum, and
free-form objects marked `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agentstudio.resources import GROUP, KINDS, VERSION, Resource, Status

_KEEP = {
    "type", "description", "properties", "required", "items", "enum", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "minItems", "maxItems", "additionalProperties", "default", "nullable",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON Schema node into a structural OpenAPI v3 node."""
    if "$ref" in schema:
        target = defs[schema["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {schema['anyOf']} structurally")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        if rest.get("default", ...) is None:
            del rest["default"]
        return structural({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    if "const" in schema:
        out["enum"] = [schema["const"]]
    for key, value in schema.items():
        if key not in _KEEP:
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = structural(value, defs)
        elif key == "default" and value is None:
            continue
        elif key == "default" and isinstance(value, dict):
            # An API server refuses a null inside a default for a field that is not nullable.
            out[key] = {k: v for k, v in value.items() if v is not None}
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap; the API shows one paragraph
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema's numeric form; Kubernetes' OpenAPI v3 wants the bound plus a flag.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
        if out.get("type") not in ("object", None):
            out.pop("type")
        if "default" in out and out["default"] == {}:
            out.pop("default")
    elif "type" not in out and "enum" in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "integer" and "default" in out and isinstance(out["default"], float):
        out["default"] = int(out["default"])
    return out


def _spec_schema(model: type[Resource]) -> dict[str, Any]:
    spec_model = model.model_fields["spec"].annotation
    raw = spec_model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[union-attr]
    schema = structural(raw, raw.get("$defs", {}))
    schema["description"] = model.DESCRIPTION
    return schema


def _status_schema() -> dict[str, Any]:
    raw = Status.model_json_schema(by_alias=True, mode="validation")
    schema = structural(raw, raw.get("$defs", {}))
    schema["x-kubernetes-preserve-unknown-fields"] = True  # kind-specific fields (keyHint, slug, ...)
    schema["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    schema["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    schema["properties"]["conditions"].pop("default", None)
    return schema


def crd(model: type[Resource]) -> dict[str, Any]:
    plural = model.PLURAL
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "agent-studio"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": model.KIND,
                "listKind": f"{model.KIND}List",
                "plural": plural,
                "singular": model.KIND.lower(),
                "shortNames": list(model.SHORT_NAMES),
                "categories": ["agentstudio"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {k: (int(v) if k == "priority" else v) for k, v in col.items()}
                        for col in model.PRINTER_COLUMNS
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": model.DESCRIPTION,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": _spec_schema(model),
                                "status": _status_schema(),
                            },
                            **({"x-kubernetes-validations": list(model.ROOT_RULES)} if model.ROOT_RULES else {}),
                        }
                    },
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors in generated files
        return True


_ORDER = ("type", "description")


def _ordered(node: Any) -> Any:
    if isinstance(node, dict):
        keys = [k for k in _ORDER if k in node] + [k for k in node if k not in _ORDER]
        return {k: _ordered(node[k]) for k in keys}
    if isinstance(node, list):
        return [_ordered(v) for v in node]
    return node


# Kopf's peering resource: operator replicas record themselves in a KopfPeering object so that only
# the one with the highest priority works (kopf's documented CRD).
KOPF_PEERING_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "kopfpeerings.kopf.dev", "labels": {"app.kubernetes.io/part-of": "agent-studio"}},
    "spec": {
        "scope": "Namespaced",
        "group": "kopf.dev",
        "names": {"kind": "KopfPeering", "plural": "kopfpeerings", "singular": "kopfpeering"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                    }
                },
            }
        ],
    },
}


def render_all() -> dict[str, str]:
    """File name → YAML text of every CRD."""
    header = "# Generated by `agent-studio crds` from agentstudio/resources.py. Do not edit.\n"

    def dump(doc: dict[str, Any]) -> str:
        return header + yaml.dump(_ordered(doc), Dumper=_Dumper, sort_keys=False, width=100)

    out = {f"{model.PLURAL}.{GROUP}.yaml": dump(crd(model)) for model in KINDS.values()}
    out["kopfpeerings.kopf.dev.yaml"] = dump(KOPF_PEERING_CRD)
    return out


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
