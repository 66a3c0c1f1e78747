"""Hypothesis over manifests: the examples, broken at random places in random ways, through
`agent-studio validate` and the compile the operator runs. Never a crash; every error names the file
and, unless the whole document is wrong, the field."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentstudio import keys
from agentstudio.bundle import KeyMaterial, compile_bundle
from agentstudio.manifests import read_dir
from agentstudio.validate import validate_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None] for p in sorted(EXAMPLES.glob("*.yaml"))}

# What a person or a broken generator puts where a value belongs: wrong types, templates that do not
# parse, names Kubernetes refuses, sizes no field expects.
scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "{{", "{{ user.name ", "{% if %}", "{{ 1/0 }}", "UPPER_case!", "a" * 300,
                       "agentstudio.io/v1alpha1", "Agent", "Workflow", "ApiKey", "-1", "1e309", "+919876543210",
                       "trial-followup-agent", "free-trial-followup", "PT5M", "25:00", "Mon-Fri"])
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8) | st.sampled_from(["slug", "name", "spec", "prompt", "tools", "steps", "type"]),
    inner, max_size=3), max_leaves=8)


@st.composite
def broken(draw: st.DrawFn) -> tuple[str, list[Any]]:
    """One example file with one to three of its values replaced, removed or joined by a stray key."""
    name = draw(st.sampled_from(sorted(FILES)))
    documents = copy.deepcopy(FILES[name])
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(documents) - 1))
        holder: Any = documents
        key: Any = i
        while True:  # walk down while the draw says deeper
            value = holder[key]
            children = list(value) if isinstance(value, dict) else list(range(len(value))) if isinstance(value, list) else []
            if not children or not draw(st.booleans()):
                break
            holder, key = value, draw(st.sampled_from(children))
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace" or not isinstance(holder, (dict, list)):
            holder[key] = draw(values)
        elif action == "remove":
            del holder[key]
            if holder is documents and not documents:
                documents.append(None)
        elif isinstance(holder[key], dict):
            holder[key][draw(st.text(min_size=1, max_size=8))] = draw(values)
        else:
            holder[key] = draw(values)
    return name, documents


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=broken())
def test_broken_manifests_get_errors_naming_file_and_field(case: tuple[str, list[Any]]) -> None:
    name, documents = case
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / name
        file.write_text(yaml.safe_dump_all(documents, allow_unicode=True))
        report = validate_dir(Path(folder))
        found = read_dir(Path(folder))
        # The operator's compile, with key material for each ApiKey as the operator has from Secrets.
        material = {i.resource.name: [KeyMaterial(keys.digest(keys.generate("live")))]
                    for i in found.resources if i.resource.kind == "ApiKey"}
        operator = compile_bundle("t", found.resources, material, found.rejected)
    for problem in [*report.errors, *operator.errors]:
        assert problem.source == str(file), problem
        assert problem.message, problem
        whole_document = problem.message in ("document is not a mapping",) or problem.message.startswith("not valid YAML")
        assert problem.path or whole_document, f"no field named: {problem}"
        assert report.describe(problem).startswith(str(file)), problem
