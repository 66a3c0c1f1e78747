"""Template checks used by validate and the compiler."""

from __future__ import annotations

from agentstudio import templating


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
