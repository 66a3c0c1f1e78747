"""The one place that parses and renders prompt and tool templates (Jinja2, sandboxed).

Caller data is only ever a template *variable*, never template source, so a `user_context` value of
`{{ 7*7 }}` reaches the model literally. A missing variable, or a key of one, renders as an empty string.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, meta, nodes, sandbox
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# Roots a template may read. `params` exists only inside tool actions.
PROMPT_ROOTS = frozenset({"user", "context", "metadata"})
TOOL_ROOTS = PROMPT_ROOTS | {"params"}

# Jinja's filters minus those that read attributes by a computed name (`attr`; `.` and `[]` say the
# same and are checked) or only make sense for HTML (`safe`, `escape`, `urlize`, `xmlattr`, …): a
# prompt is text.
_NOT_OFFERED = frozenset({"attr", "e", "escape", "forceescape", "pprint", "safe", "striptags", "urlize", "xmlattr"})

# Filters whose string arguments name an attribute, a filter or a test: (positions, keywords) of
# each, checked like `.name`, so `map(attribute='__class__')` is refused before it is published.
_ATTRIBUTE_ARGS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "map": ((), ("attribute",)),
    "selectattr": ((0,), ()),
    "rejectattr": ((0,), ()),
    "groupby": ((0,), ("attribute",)),
    "sum": ((0,), ("attribute",)),
    **{name: ((), ("attribute",)) for name in ("sort", "unique", "min", "max")},
}
_FILTER_ARGS = {"map": 0}  # map('upper'): a filter name at position 0 (unless attribute= is given)
_TEST_ARGS = {"select": 0, "reject": 0, "selectattr": 1, "rejectattr": 1}

# Attributes the immutable sandbox refuses on some object a template can reach: underscore names
# (checked apart), methods that change a list, dict, set or deque, and generator internals.
_UNSAFE_NAMES = frozenset(
    name
    for probe in ([], {}, set(), collections.deque())
    for name in dir(probe)
    if sandbox.modifies_known_mutable(probe, name)
) | sandbox.UNSAFE_GENERATOR_ATTRIBUTES | sandbox.UNSAFE_COROUTINE_ATTRIBUTES | sandbox.UNSAFE_ASYNC_GENERATOR_ATTRIBUTES


# The most a `*` may build (characters or items), the largest exponent of a `**`, and the largest
# integer either may make (in bits, about 3,000 digits).
MAX_PRODUCT = 100_000
MAX_EXPONENT = 100
MAX_BITS = 10_000


def _bounded(operator: str, left: Any, right: Any) -> Any:
    """`left * right` or `left ** right`, refused before it is computed if it would be huge."""
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**":
        if isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"an exponent above {MAX_EXPONENT} is not offered")
        if ints and right > 0 and abs(left).bit_length() * right > MAX_BITS:
            raise SecurityError(f"'**' would make a number of more than {MAX_BITS} bits")
        return left**right
    if ints and abs(left).bit_length() + abs(right).bit_length() > MAX_BITS:
        raise SecurityError(f"'*' would make a number of more than {MAX_BITS} bits")
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_PRODUCT:
            raise SecurityError(f"'*' would build more than {MAX_PRODUCT} characters or items")
    return left * right


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with `*` and `**` bounded. Intercepting them also stops Jinja from
    folding them at compile time, which `{{ 'x' * 10**10 }}` would otherwise make allocate 10 GB
    in whoever compiles the template: the operator's check or the voice agent."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return _bounded(operator, left, right)


def _environment() -> ImmutableSandboxedEnvironment:
    # ChainableUndefined: `user.address.city` with no address renders "" instead of failing the call.
    env = _Sandbox(autoescape=False, keep_trailing_newline=True, undefined=ChainableUndefined)
    # Jinja's default globals (range, dict, lipsum, cycler, joiner, namespace) are none of ours: a
    # template reads its variables and nothing else, so no name can reach a Python object.
    env.globals.clear()
    for name in _NOT_OFFERED:
        del env.filters[name]
    return env


_env = _environment()
OFFERED_FILTERS = frozenset(_env.filters)


class _AnyName(dict[str, Any]):
    """Every filter and test name, so scoping analysis runs on templates that name unknown ones."""

    def __contains__(self, name: object) -> bool:
        return True

    def get(self, name: str, default: Any = None) -> Any:
        return len


_scoping_env = _Sandbox()
_scoping_env.globals.clear()
_scoping_env.filters = _AnyName()
_scoping_env.tests = _AnyName()


# Nodes that bind names or open a scope. A template without them (prints, ifs, expressions: most
# prompts) looks every name it reads up in the context, so the compiler's analysis, which costs as
# much as the parse, is needed only for the others.
_SCOPING = (nodes.For, nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.With, nodes.Block,
            nodes.Scope, nodes.OverlayScope, nodes.Assign, nodes.AssignBlock)


@lru_cache(maxsize=65536)
def _looked_up(source: str) -> frozenset[str]:
    """The names Jinja's compiler looks up in the render context, after its own scoping: a name a
    `for` binds inside the loop and a template reads after it is counted, as it is at render time."""
    tree = _parse(source)
    # `self` is the template itself, never a context lookup (and refused apart)
    read = frozenset(n.name for n in tree.find_all(nodes.Name) if n.ctx == "load") - {"self"}
    if next(tree.find_all(_SCOPING), None) is None:
        return read
    tracker = meta.TrackingCodeGenerator(_scoping_env)
    tracker.visit(tree)
    # A name set in only one branch of an `if` is looked up as the other branch's value; it matters
    # only if the template reads it.
    return frozenset(tracker.undeclared_identifiers) & read


@dataclass(frozen=True)
class TemplateProblem:
    message: str
    line: int | None = None


@lru_cache(maxsize=4096)
def _parse(source: str) -> nodes.Template:
    return _env.parse(source)


def check(source: str, roots: frozenset[str]) -> list[TemplateProblem]:
    """Problems with a template: syntax errors, variables outside `roots`, and anything the sandbox
    would refuse when rendering (underscore or mutating attributes, filters we do not offer).

    Static, on the parsed tree, so every branch counts: rendering once against sample values would
    miss what sits behind an `if` the sample does not take.
    """
    return list(_check(source, roots))


# Results are small and a recompile sees mostly the same templates: cache far more than the trees.
@lru_cache(maxsize=65536)
def _check(source: str, roots: frozenset[str]) -> tuple[TemplateProblem, ...]:
    try:
        tree = _parse(source)
    except TemplateSyntaxError as exc:
        return (TemplateProblem(f"template does not parse: {exc.message}", exc.lineno),)
    unknown = sorted(_looked_up(source) - roots)
    allowed = ", ".join(sorted(roots))
    problems = [TemplateProblem(f"unknown template variable {name!r} (allowed: {allowed})") for name in unknown]
    return (*problems, *_refused(tree))


# Not offered: there is no loader, so include, import and extends would fail on the call; without
# extends a block is pointless and its super() fails; a macro called with the wrong arguments fails
# only when rendered. A prompt needs none of them.
_NOT_OFFERED_TAGS = {
    nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "import", nodes.Extends: "extends",
    nodes.Block: "block", nodes.Macro: "macro", nodes.CallBlock: "call",
}


def _refused(tree: nodes.Template) -> list[TemplateProblem]:
    problems: list[TemplateProblem] = []
    folded: dict[int, Any] = {}
    wanted = (nodes.Name, nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Test, nodes.Call, nodes.Mul, nodes.Pow)
    for node in tree.find_all((*wanted, *_NOT_OFFERED_TAGS)):
        line = node.lineno
        if type(node) in _NOT_OFFERED_TAGS:
            problems.append(TemplateProblem(f"{{% {_NOT_OFFERED_TAGS[type(node)]} %}} is not offered: a template is one string", line))
        elif isinstance(node, nodes.Name) and node.name == "self" and node.ctx == "load":
            problems.append(TemplateProblem("'self' (the template itself) is not readable", line))
        elif isinstance(node, nodes.Getattr):
            problems += _attribute_problems(node.attr, line)
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            problems += _attribute_problems(node.arg.value, line)
        elif isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr) and node.node.attr in ("format", "format_map"):
            problems.append(TemplateProblem(f".{node.node.attr}() is not offered; use the format filter", line))
        elif isinstance(node, nodes.Filter):
            problems += _filter_problems(node)
        elif isinstance(node, nodes.Test) and node.name not in _env.tests:
            problems.append(TemplateProblem(f"unknown test {node.name!r}", line))
        elif isinstance(node, (nodes.Mul, nodes.Pow)):
            try:
                _folded(node, folded)
            except nodes.Impossible:
                pass  # it involves data: bounded when rendered
            except SecurityError as exc:
                problems.append(TemplateProblem(str(exc), line))
    return problems


def _folded(node: nodes.Expr, memo: dict[int, Any]) -> Any:
    """The value of a constant expression, `*` and `**` bounded; nodes.Impossible if it is not constant.
    `memo` keeps each product's value, so a long chain is folded once, not once per link."""
    if not isinstance(node, (nodes.Mul, nodes.Pow)):
        return node.as_const(nodes.EvalContext(_env))
    if id(node) not in memo:
        try:
            memo[id(node)] = _bounded(node.operator, _folded(node.left, memo), _folded(node.right, memo))
        except nodes.Impossible as exc:
            memo[id(node)] = exc
    if isinstance(memo[id(node)], nodes.Impossible):
        raise memo[id(node)]
    return memo[id(node)]


def _attribute_problems(name: str, line: int) -> list[TemplateProblem]:
    if name.startswith("_"):
        return [TemplateProblem(f"{name!r}: names starting with '_' are never readable in a template", line)]
    if name in _UNSAFE_NAMES:
        return [TemplateProblem(f"{name!r} is a method that changes its object; read such a key as x[{name!r}]", line)]
    return []


def _filter_problems(node: nodes.Filter) -> list[TemplateProblem]:
    line = node.lineno
    if node.name not in _env.filters:
        return [TemplateProblem(f"unknown filter {node.name!r} (offered: {', '.join(sorted(OFFERED_FILTERS))})", line)]
    positions, keywords = _ATTRIBUTE_ARGS.get(node.name, ((), ()))
    names: list[tuple[nodes.Expr, str]] = [(node.args[i], "attribute") for i in positions if i < len(node.args)]
    names += [(kw.value, "attribute") for kw in node.kwargs if kw.key in keywords]
    if node.name in _FILTER_ARGS and not any(kw.key == "attribute" for kw in node.kwargs) and node.args:
        names.append((node.args[_FILTER_ARGS[node.name]], "filter"))
    if node.name in _TEST_ARGS and len(node.args) > _TEST_ARGS[node.name]:
        names.append((node.args[_TEST_ARGS[node.name]], "test"))
    if names and (node.dyn_args is not None or node.dyn_kwargs is not None):
        return [TemplateProblem(f"filter {node.name!r}: write its arguments out, not as *args or **kwargs", line)]
    problems: list[TemplateProblem] = []
    for arg, what in names:
        if not (isinstance(arg, nodes.Const) and isinstance(arg.value, str)):
            problems.append(TemplateProblem(f"filter {node.name!r}: the {what} it uses must be a quoted name", line))
        elif what == "attribute":
            problems += [p for part in arg.value.split(".") for p in _attribute_problems(part, line)]
        elif what == "filter" and arg.value not in _env.filters:
            problems.append(TemplateProblem(f"unknown filter {arg.value!r}", line))
        elif what == "test" and arg.value not in _env.tests:
            problems.append(TemplateProblem(f"unknown test {arg.value!r}", line))
    return problems


def variable_paths(source: str) -> set[tuple[str, ...]]:
    """Dotted paths the template reads from its variables, e.g. {("user", "name"), ("metadata",)}."""
    tree = _parse(source)
    looked_up = _looked_up(source)
    paths: set[tuple[str, ...]] = set()

    def walk(node: nodes.Node, parents_cover: bool) -> None:
        path = _path_of(node)
        if path is not None and not parents_cover:
            if path[0] in looked_up:
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
    return _compiled(source).render(variables)


# Compiling costs about 1 ms a template, rendering a compiled one microseconds; a call renders its
# agents' prompts and every string of a tool's body on each use, from a bundle's few fixed sources.
# Bounded lower than the checks' caches: a compiled template holds code, not a small result.
@lru_cache(maxsize=1024)
def _compiled(source: str) -> Template:
    return _env.from_string(source)


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
