"""The direction of data, as imports: each role package imports only what is shared or upstream of
it. Ingest and the dialers meet only on the stream; the conversation is hosted by the dialer, not
the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "agentstudio"

# role package → the role packages it must not import
FORBIDDEN = {
    "ingest": {"dialer", "conversation", "operator"},
    "conversation": {"dialer", "ingest", "operator"},
    "operator": {"ingest", "dialer", "conversation"},
    "dialer": {"ingest", "operator"},
}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module the source of a module in `package` imports, anywhere in it (a function's late
    import counts too), as absolute names."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("role", sorted(FORBIDDEN))
def test_a_role_imports_no_role_it_must_not_reach(role: str) -> None:
    crossings = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {module}"
        for path in (PACKAGE / role).rglob("*.py")
        for module in imported_modules(path.read_text(), ".".join(path.relative_to(PACKAGE.parent).parts[:-1]))
        if module.split(".")[0] == "agentstudio" and len(module.split(".")) > 1
        and module.split(".")[1] in FORBIDDEN[role]
    )
    assert crossings == []


def test_the_rule_sees_relative_and_late_imports() -> None:
    source = "import agentstudio.bus\ndef f():\n    from ...dialer import webhooks\n    from . import auth\n"
    found = imported_modules(source, "agentstudio.ingest.routes")
    assert {"agentstudio.bus", "agentstudio.dialer.webhooks", "agentstudio.ingest.routes.auth"} <= found
