"""`agent-studio validate DIR`: the operator's checks, offline, on a folder of manifests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from agentstudio.bundle import compile_bundle
from agentstudio.manifests import Located, Problem, Rejected, read_dir


@dataclass(frozen=True)
class Report:
    errors: list[Problem]
    warnings: list[Problem]
    resources: list[Located]
    rejected: list[Rejected]

    @cached_property
    def _names(self) -> dict[tuple[str, int | None], str]:
        names = {(r.source, r.index): f"{r.resource.kind}/{r.resource.name}" for r in self.resources}
        return names | {(r.source, r.index): f"{r.kind}/{r.name}" for r in self.rejected}

    def describe(self, problem: Problem) -> str:
        """`file (document N) Kind/name path: message`; the resource is left out when its document
        does not say which it is."""
        name = self._names.get((problem.source, problem.index))
        if name is None:
            return str(problem)
        at = f" {problem.path}" if problem.path else ""
        return f"{problem.where} {name}{at}: {problem.message}"


def validate_dir(directory: Path) -> Report:
    found = read_dir(directory)
    errors = list(found.problems)
    warnings: list[Problem] = []
    tenants: dict[str | None, tuple[list[Located], list[Rejected]]] = {}
    for item in found.resources:
        tenants.setdefault(item.namespace, ([], []))[0].append(item)
    for refused in found.rejected:
        tenants.setdefault(refused.namespace, ([], []))[1].append(refused)
    for tenant, (items, rejected) in tenants.items():
        result = compile_bundle(tenant or "default", items, {}, rejected)
        errors += result.errors
        warnings += result.warnings
    # file by file, document by document, as a user fixes them; stable, so each keeps its order
    errors.sort(key=lambda p: (p.source, -1 if p.index is None else p.index))
    return Report(errors, warnings, found.resources, found.rejected)
