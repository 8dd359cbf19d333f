"""Early-exit and serving settings: defaults, and bad input stopped before any job with one line
naming the key (through validate_config, which the Snakefile runs first)."""

import copy
import re

import pytest
import yaml

import lamda_repro.recursive  # noqa: F401  (registers the check of the recursive section)
from lamda_repro.config import ConfigError, validate_config
from lamda_repro.recursive.runner import resolve_section
from lamda_repro.recursive.serving.config import (
    SERVING_DEFAULTS,
    early_exit_config,
    latency_table_path,
    resolve_serving,
)


@pytest.fixture(scope="module")
def smoke(repo_root):
    return yaml.safe_load((repo_root / "config" / "config.yaml").read_text())


def _with(smoke, edit):
    cfg = copy.deepcopy(smoke)
    edit(cfg["recursive"])
    return cfg


def test_the_smoke_config_serves_a_recursive_and_a_relaxed_run(smoke):
    section = resolve_section(smoke["recursive"])
    serving = resolve_serving(section)
    assert serving["runs"] == ["tiny--rt-stepwise", "tiny--rrt-r4"] and serving["vanilla"] == "tiny--full"
    assert 0 < serving["threshold"] <= 1 and serving["latency"] == SERVING_DEFAULTS["latency"]
    run = next(r for r in section["runs"] if r["name"] == "rt-stepwise")
    cfg = early_exit_config(section, run)
    assert cfg.intermediate_weight == 0.1 and cfg.final_weight == 1.0 and cfg.steps == 40
    assert serving["paper_estimate"]["roofline"] == ["a100-40gb", "h100-sxm"]
    assert serving["paper_estimate"]["latency_tables"] is None  # the smoke's estimate is the roofline
    assert latency_table_path("results/reference/latency/gemma-2b.cpu.json").is_file()


def _set(path, value):
    def edit(section):
        target = section
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _run(name, **changes):
    def edit(section):
        run = next(r for r in section["runs"] if r["name"] == name)
        run.update(changes)

    return edit


S = r"^recursive\.serving\."
BAD = [
    (_set(["serving", "threshold"], 0), S + r"threshold: must be > 0, got 0$"),
    (_set(["serving", "threshold"], 1.5), S + r"threshold: must be <= 1, got 1\.5$"),
    (_set(["early_exit", "thresholds"], [0.5, 0.0]), r"^recursive\.early_exit\.thresholds\[1\]: must be > 0"),
    (_run("rrt-r4", early_exit={"thresholds": [1.01]}), r"^recursive\.runs\[\d+\]\.early_exit"),
    (_set(["serving", "workload", "num_requests"], 0), S + r"workload\.num_requests: must be >= 1"),
    (_set(["serving", "workload", "gen_len"], [5, 2]), S + r"workload\.gen_len: needs 1 <= min"),
    (_set(["serving", "max_batch"], 0), S + r"max_batch: must be >= 1, got 0$"),
    (
        _set(["serving", "runs"], ["tiny--first-half"]),
        S + r"runs\[0\]: tiny--first-half is not a recursive model",
    ),
    (_set(["serving", "runs"], ["tiny--rt-average"]), S + r"runs\[0\]: tiny--rt-average has no early_exit"),
    (_set(["serving", "runs"], ["tiny--nope"]), S + r"runs\[0\]: no recursive run 'tiny--nope'"),
    (
        _set(["serving", "vanilla"], "tiny--rt-stepwise"),
        S + r"vanilla: .* the baseline must be variant original",
    ),
    (
        _run("first-half", early_exit=True),
        r"^recursive\.runs\.first-half\.early_exit: early exit needs variant",
    ),
    (_set(["serving", "memory_budget_mb"], -1), S + r"memory_budget_mb: must be > 0"),
    (_set(["serving", "paper_estimate", "latency_tables"], ""), S + r"paper_estimate\.latency_tables"),
    (_set(["serving", "paper_estimate", "roofline"], ["tpu-v9"]), S + r"paper_estimate\.roofline"),
    (_set(["serving", "paper_estimate", "roofline"], []), S + r"paper_estimate: needs latency_tables"),
]


@pytest.mark.parametrize(
    "edit,message", BAD, ids=[m.split(":")[0].lstrip("^").replace("\\", "") for _, m in BAD]
)
def test_bad_serving_input_fails_with_one_line_naming_the_key(smoke, edit, message):
    with pytest.raises(ConfigError) as info:
        validate_config(_with(smoke, edit))
    text = str(info.value)
    assert "\n" not in text
    assert re.search(message, text), text


def test_serving_can_be_switched_off(smoke):
    cfg = _with(smoke, _set(["serving", "enabled"], False))
    validate_config(cfg)
    assert resolve_serving(resolve_section(cfg["recursive"])) is None
