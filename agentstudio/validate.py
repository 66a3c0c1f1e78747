"""`agent-studio validate DIR`: the operator's checks, offline, on a folder of manifests."""

from __future__ import annotations

from pathlib import Path

from agentstudio.bundle import compile_bundle
from agentstudio.manifests import Located, Problem, load_dir


def validate_dir(directory: Path) -> tuple[list[Problem], list[Problem], int]:
    """(errors, warnings, number of resources read)."""
    resources, errors = load_dir(directory)
    warnings: list[Problem] = []
    by_tenant: dict[str | None, list[Located]] = {}
    for item in resources:
        by_tenant.setdefault(item.namespace, []).append(item)
    for tenant, items in by_tenant.items():
        result = compile_bundle(tenant or "default", items, {})
        errors += result.errors
        warnings += result.warnings
    return errors, warnings, len(resources)
