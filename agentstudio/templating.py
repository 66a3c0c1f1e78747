"""The one place that parses and renders prompt and tool templates (Jinja2, sandboxed).

Caller data is only ever a template *variable*, never template source, so a `user_context` value of
`{{ 7*7 }}` reaches the model literally. A missing variable renders as an empty string.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Roots a template may read. `params` exists only inside tool actions.
PROMPT_ROOTS = frozenset({"user", "context", "metadata"})
TOOL_ROOTS = PROMPT_ROOTS | {"params"}

_env = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True)
class TemplateProblem:
    message: str
    line: int | None = None


@lru_cache(maxsize=4096)
def _parse(source: str) -> nodes.Template:
    return _env.parse(source)


def check(source: str, roots: frozenset[str]) -> list[TemplateProblem]:
    """Problems with a template: syntax errors and variables outside `roots`."""
    try:
        tree = _parse(source)
    except TemplateSyntaxError as exc:
        return [TemplateProblem(f"template does not parse: {exc.message}", exc.lineno)]
    del tree
    unknown = sorted({path[0] for path in variable_paths(source) if path[0] not in roots})
    return [
        TemplateProblem(f"unknown template variable {name!r} (allowed: {', '.join(sorted(roots))})")
        for name in unknown
    ]


def variable_paths(source: str) -> set[tuple[str, ...]]:
    """Dotted paths the template reads, e.g. {("user", "name"), ("metadata",)}."""
    tree = _parse(source)
    assigned = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    paths: set[tuple[str, ...]] = set()

    def walk(node: nodes.Node, parents_cover: bool) -> None:
        path = _path_of(node)
        if path is not None and not parents_cover:
            if path[0] not in assigned:
                paths.add(path)
            parents_cover = True
        for child in node.iter_child_nodes():
            # A Getattr's inner Name is part of the same path; don't count it again.
            walk(child, parents_cover and isinstance(node, (nodes.Getattr, nodes.Getitem)))

    walk(tree, False)
    return paths


def _path_of(node: nodes.Node) -> tuple[str, ...] | None:
    if isinstance(node, nodes.Name) and node.ctx == "load":
        return (node.name,)
    if isinstance(node, nodes.Getattr):
        inner = _path_of(node.node)
        return None if inner is None else (*inner, node.attr)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        inner = _path_of(node.node)
        return None if inner is None else (*inner, str(node.arg.value))
    return None


def render(source: str, variables: dict[str, Any]) -> str:
    """Render one template string; variables are data and are never parsed as templates."""
    return _env.from_string(source).render(variables)


def render_json(value: Any, variables: dict[str, Any]) -> Any:
    """Render every string inside a JSON value, value by value, so data cannot break the JSON."""
    if isinstance(value, str):
        return render(value, variables)
    if isinstance(value, list):
        return [render_json(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: render_json(v, variables) for k, v in value.items()}
    return value


def json_strings(value: Any) -> list[str]:
    """Every string inside a JSON value (the templates of a tool body)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in json_strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in json_strings(v)]
    return []
