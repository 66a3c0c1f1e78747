"""Template checks used by validate and the compiler."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from jinja2.sandbox import SecurityError

from agentstudio import templating
from agentstudio.bundle import compile_bundle
from conftest import docs


def test_variable_paths_are_found() -> None:
    paths = templating.variable_paths(
        "Hi {{user.name}} {{ metadata['campaign_id'] }} {% for x in user.items %}{{ x }}{% endfor %} {{context.phone_number|upper}}"
    )
    assert paths == {("user", "name"), ("metadata", "campaign_id"), ("user", "items"), ("context", "phone_number")}


def test_unknown_roots_and_syntax_errors_are_problems() -> None:
    assert templating.check("{{user.name}} {{params.x}}", templating.TOOL_ROOTS) == []
    [problem] = templating.check("{{params.x}}", templating.PROMPT_ROOTS)
    assert "unknown template variable 'params'" in problem.message
    [problem] = templating.check("{{ user.name ", templating.PROMPT_ROOTS)
    assert "does not parse" in problem.message and problem.line == 1


def test_caller_data_is_never_template_source() -> None:
    variables = {"user": {"name": "{{ 7*7 }}", "x": "{{ ''.__class__.__mro__ }}"}}
    assert templating.render("Hi {{user.name}} {{user.x}}", variables) == "Hi {{ 7*7 }} {{ ''.__class__.__mro__ }}"


def test_missing_variables_render_empty() -> None:
    assert templating.render("Hi {{user.name}}!", {"user": {}}) == "Hi !"


def test_json_renders_value_by_value() -> None:
    body = {"name": "{{user.name}}", "n": 3, "tags": ["{{metadata.a}}"]}
    out = templating.render_json(body, {"user": {"name": 'Ann "Jo"\n'}, "metadata": {"a": "b"}})
    assert out == {"name": 'Ann "Jo"\n', "n": 3, "tags": ["b"]}


# What the issue found passing `validate` and then failing (or leaking Python objects) on a live call.
REFUSED = {
    "{% for cycler in [] %}{% endfor %}{{ cycler }}": "unknown template variable 'cycler'",
    "{{ range(3) }}": "unknown template variable 'range'",
    "{{ lipsum() }}": "unknown template variable 'lipsum'",
    "{{ ''.__class__.__mro__ }}": "'__class__': names starting with '_' are never readable",
    "{{ user['__class__'] }}": "'__class__': names starting with '_' are never readable",
    "{{ user.pop('name') }}": "'pop' is a method that changes its object",
    "{{ self }}": "'self' (the template itself) is not readable",
    "{{ '{0.__class__}'.format(user) }}": ".format() is not offered",
    "{{ user.name | nosuch }}": "unknown filter 'nosuch'",
    "{% if user.vip %}{{ user.name | nosuch }}{% endif %}": "unknown filter 'nosuch'",
    "{{ user | attr('name') }}": "unknown filter 'attr'",
    "{{ user.orders | map(attribute='__class__') | list }}": "'__class__': names starting with '_'",
    "{{ user.orders | map(attribute='sku.__class__') | list }}": "'__class__': names starting with '_'",
    "{{ user.orders | map(attribute=user.field) | list }}": "the attribute it uses must be a quoted name",
    "{{ user.orders | map('nosuch') | list }}": "unknown filter 'nosuch'",
    "{{ user.orders | selectattr('_x') | list }}": "'_x': names starting with '_'",
    "{{ user.orders | select(user.test) | list }}": "the test it uses must be a quoted name",
    "{{ user.n is nosuch }}": "unknown test 'nosuch'",
    "{% include 'other' %}": "{% include %} is not offered",
    "{% from 'x' import y %}{{ y }}": "{% import %} is not offered",
    "{% block greeting %}{{ super() }}{% endblock %}": "{% block %} is not offered",
    "{% macro m(a) %}{{ a }}{% endmacro %}{{ m(1, 2) }}": "{% macro %} is not offered",
    "{{ 'x' * 10**10 }}": "'*' would build more than 100000 characters or items",
    "{% set a = 1 %}{{ [a] * 10**10 }}{{ 'x' * 10**10 }}": "'*' would build more than 100000",
    "{{ ((10**100)**100)**100 }}": "'**' would make a number of more than 10000 bits",
    "{{ 2 ** 1000 }}": "an exponent above 100 is not offered",
    "{% set x = 1 %}{% for loop_var in [1] %}{% endfor %}{{ loop }}": "unknown template variable 'loop'",
}


def test_what_the_sandbox_would_refuse_or_a_global_would_leak_is_refused_before_publishing() -> None:
    for source, expected in REFUSED.items():
        messages = [p.message for p in templating.check(source, templating.TOOL_ROOTS)]
        assert any(expected in m for m in messages), (source, messages)


def test_names_a_template_binds_itself_are_not_unknown() -> None:
    for source in (
        "{% if user.vip %}{% set tone = 'warm' %}{% endif %}{{ user.name }}",
        "{% set greeting = 'Hi' %}{{ greeting }} {{ user.name }}",
        "{% for order in user.orders %}{{ loop.index }}. {{ order.sku }}{% endfor %}",
        "{% with greeting = 'Hi' %}{{ greeting }}{% endwith %} {% filter upper %}{{ user.name }}{% endfilter %}",
        "{{ user.orders | map(attribute='sku') | join(', ') }} {{ user.orders | selectattr('paid') | list | length }}",
        "{{ user['_id'] is defined }}{{ '%s!' | format(user.name) }}",
    ):
        problems = templating.check(source, templating.PROMPT_ROOTS)
        if source.startswith("{{ user['_id']"):
            assert [p.message for p in problems] == ["'_id': names starting with '_' are never readable in a template"]
        else:
            assert problems == [], (source, problems)


def test_names_bound_only_in_some_branches_or_only_inside_a_loop_are_looked_up() -> None:
    [problem] = templating.check("{% if user.vip %}{% set tone = 'warm' %}{% endif %}{{ tone }}", templating.PROMPT_ROOTS)
    assert "unknown template variable 'tone'" in problem.message
    [problem] = templating.check("{% for x in user.items %}{% endfor %}{{ x }}", templating.PROMPT_ROOTS)
    assert "unknown template variable 'x'" in problem.message


def test_products_are_bounded_when_rendered_and_small_ones_work() -> None:
    assert templating.check("{{ '-' * 20 }} {{ 2 ** 10 }} {{ user.n * 3 }}", templating.PROMPT_ROOTS) == []
    assert templating.render("{{ '-' * 3 }}{{ 2 ** 10 }} {{ user.n * 3 }}", {"user": {"n": 4}}) == "---1024 12"
    with pytest.raises(SecurityError):
        templating.render("{{ user.name * user.n }}", {"user": {"name": "ab", "n": 10**6}})


def test_checking_a_template_never_builds_what_it_describes() -> None:
    # Jinja folds constant expressions while compiling, and the check runs its compiler's analysis.
    tracemalloc.start()
    try:
        templating.check("{% set a = 1 %}{{ 'x' * 10**8 }}", templating.PROMPT_ROOTS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, peak  # it was 100 MB and more


def test_jinja_globals_are_gone_from_rendering() -> None:
    assert templating.render("{% for cycler in [] %}{% endfor %}[{{ cycler }}]", {}) == "[]"
    assert templating.render("[{{ namespace }}{{ dict }}{{ joiner }}]", {}) == "[]"


def test_a_missing_nested_key_renders_empty_instead_of_failing() -> None:
    assert templating.render("Hi {{ user.address.city }}!", {"user": {}}) == "Hi !"
    assert templating.render("{{ user.address.city | default('there') }}", {"user": {}}) == "there"


SNEAKY_AGENT = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: sneaky}
spec:
  prompt: "{% for cycler in [] %}{% endfor %}You are {{ cycler }}"
  firstMessage: "Hi {{ ''.__class__.__mro__ }}"
  tools:
    - name: log
      action:
        type: api_call
        url: "https://crm.example/{{ range(3) }}"
        headers: {X-Trace: "{{ lipsum() }}"}
        body: {who: "{{ params.x.__class__ }}"}
"""


def test_the_compiler_refuses_them_in_every_template_field_so_the_operator_never_publishes() -> None:
    result = compile_bundle("t", docs(SNEAKY_AGENT), {})
    assert result.bundle is None
    found = {(p.path, p.reason, p.message.split(" (")[0]) for p in result.errors}
    assert found == {
        ("spec.prompt", "InvalidTemplate", "unknown template variable 'cycler'"),
        ("spec.firstMessage", "InvalidTemplate", "'__class__': names starting with '_' are never readable in a template"),
        ("spec.firstMessage", "InvalidTemplate", "'__mro__': names starting with '_' are never readable in a template"),
        ("spec.tools[0].action.url", "InvalidTemplate", "unknown template variable 'range'"),
        ("spec.tools[0].action.headers.X-Trace", "InvalidTemplate", "unknown template variable 'lipsum'"),
        ("spec.tools[0].action.body", "InvalidTemplate", "'__class__': names starting with '_' are never readable in a template"),
    }, found


def test_validate_names_the_file_and_field_of_each(tmp_path: Path) -> None:
    (tmp_path / "agents.yaml").write_text(SNEAKY_AGENT)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "agent-studio"), "validate", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    where = f"{tmp_path / 'agents.yaml'} Agent/sneaky"
    for line in (
        f"error: {where} spec.prompt: unknown template variable 'cycler'",
        f"error: {where} spec.firstMessage: '__class__': names starting with '_'",
        f"error: {where} spec.tools[0].action.body: '__class__': names starting with '_'",
    ):
        assert line in result.stdout, result.stdout
