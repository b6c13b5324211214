"""Versions (issue 11): pyproject states ranges, CI installs the pinned set inside them; the README's API example
places the models on the GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
# The packages whose internals massv reaches into, or whose file formats it writes: bounded on both sides.
BOUNDED = {"torch", "torchvision", "transformers", "tokenizers", "timm", "datasets", "accelerate", "huggingface-hub"}


def _dependencies(extras: bool = False) -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    if extras:
        lines += [line for group in project.get("optional-dependencies", {}).values() for line in group]
    requirements = [Requirement(line) for line in lines]
    return {requirement.name.lower().replace("_", "-"): requirement for requirement in requirements}


def test_dependencies_are_ranges_with_both_bounds_where_massv_depends_on_internals():
    dependencies = _dependencies()
    assert BOUNDED <= set(dependencies)
    for name, requirement in dependencies.items():
        operators = {spec.operator for spec in requirement.specifier}
        assert "==" not in operators and "===" not in operators, f"{name} is pinned: {requirement}"
        assert operators & {">=", ">", "~="}, f"{name} has no lower bound: {requirement}"
        if name in BOUNDED:
            assert operators & {"<", "<=", "~="}, f"{name} has no upper bound: {requirement}"
    assert "tested bounds" in (REPO / "pyproject.toml").read_text()


def test_ci_installs_the_pinned_pair_inside_the_ranges():
    dependencies = _dependencies(extras=True)
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[requirement.name.lower().replace("_", "-")] = spec.version
    assert {"torch", "transformers"} <= set(pins)
    for name, version in pins.items():
        assert dependencies[name].specifier.contains(version), f"CI pins {name} {version} outside {dependencies[name]}"
    assert re.search(r"pip install .*-c \.ci/constraints\.txt", (REPO / ".ci" / "run").read_text())


def test_readme_api_example_loads_the_target_on_the_gpu_in_bfloat16():
    readme = (REPO / "README.md").read_text()
    example = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    call = " ".join(example.split("AutoModelForImageTextToText.from_pretrained(", 1)[1].split(")", 1)[0].split())
    assert 'device_map="auto"' in call and "dtype=torch.bfloat16" in call
