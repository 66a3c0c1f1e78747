"""`agent-studio validate DIR`: the operator's checks, offline, on a folder of manifests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agentstudio.bundle import compile_bundle
from agentstudio.manifests import Located, Problem, load_dir


@dataclass(frozen=True)
class Report:
    errors: list[Problem]
    warnings: list[Problem]
    resources: list[Located]

    def describe(self, problem: Problem) -> str:
        """`file[doc] Kind/name path: message`; the resource is left out when its document did not parse."""
        item = next((r for r in self.resources if (r.source, r.index) == (problem.source, problem.index)), None)
        if item is None:
            return str(problem)
        where = problem.source if problem.index is None else f"{problem.source}[{problem.index}]"
        at = f" {problem.path}" if problem.path else ""
        return f"{where} {item.resource.kind}/{item.resource.name}{at}: {problem.message}"


def validate_dir(directory: Path) -> Report:
    resources, errors = load_dir(directory)
    warnings: list[Problem] = []
    by_tenant: dict[str | None, list[Located]] = {}
    for item in resources:
        by_tenant.setdefault(item.namespace, []).append(item)
    for tenant, items in by_tenant.items():
        result = compile_bundle(tenant or "default", items, {})
        errors += result.errors
        warnings += result.warnings
    return Report(errors, warnings, resources)
