"""Reading manifests: YAML files in a folder → typed resources, with every error located.

An error names the file, the document's index in that file and the field path
(`examples/agents.yaml[2] spec.tools[0].action.url: ...`), so a user can find it without guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agentstudio.resources import API_VERSION, KINDS, AnyResource

MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Problem:
    """One error or warning about a manifest."""

    source: str  # file path, or "namespace <ns>" for checks across resources
    path: str  # field path inside the document, "" for the whole document
    message: str
    index: int | None = None  # document index in a multi-document file
    reason: str = "Invalid"  # CamelCase, for Kubernetes conditions and Events

    def __str__(self) -> str:
        where = self.source if self.index is None else f"{self.source}[{self.index}]"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass(frozen=True)
class Located:
    """A parsed resource and where it came from."""

    resource: AnyResource
    source: str
    index: int | None

    @property
    def namespace(self) -> str | None:
        return self.resource.metadata.namespace


def field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse(document: Any, source: str, index: int | None) -> tuple[Located | None, list[Problem]]:
    """Parse one decoded document into a resource, or say exactly what is wrong with it."""
    if not isinstance(document, dict):
        return None, [Problem(source, "", "document is not a mapping", index)]
    if document.get("apiVersion") != API_VERSION:
        return None, [Problem(source, "apiVersion", f"must be {API_VERSION}", index)]
    kind = document.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return None, [Problem(source, "kind", f"must be one of {', '.join(KINDS)}", index)]
    try:
        resource = model.model_validate(document)
    except ValidationError as exc:
        return None, [
            Problem(source, field_path(tuple(e["loc"])), _message(e), index) for e in exc.errors()
        ]
    return Located(resource, source, index), []  # type: ignore[arg-type]


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def load_dir(directory: Path) -> tuple[list[Located], list[Problem]]:
    """Every agentstudio.io resource in the YAML files below `directory` (hidden folders skipped)."""
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in MANIFEST_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    found: list[Located] = []
    problems: list[Problem] = []
    for file in files:
        located, file_problems = load_file(file)
        found += located
        problems += file_problems
    return found, problems


def load_file(file: Path) -> tuple[list[Located], list[Problem]]:
    source = str(file)
    try:
        documents = list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return [], [Problem(source, "", f"not valid YAML: {exc}")]
    found: list[Located] = []
    problems: list[Problem] = []
    many = len(documents) > 1
    for i, document in enumerate(documents):
        if document is None:
            continue
        # Other Kubernetes objects (Secrets, ConfigMaps) may sit beside ours: not our business.
        if isinstance(document, dict) and str(document.get("apiVersion", "")).split("/")[0] not in (
            "agentstudio.io",
            "",
        ):
            continue
        located, doc_problems = parse(document, source, i if many else None)
        if located:
            found.append(located)
        problems += doc_problems
    return found, problems
