"""The LaMDA benchmark on a tiny LLaMA geometry: outputs, exactness of the extrapolation, CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from lamda_repro.bench.cli import add_cli
from lamda_repro.bench.lamda_bench import BenchConfigError, BenchSettings, run_bench, to_markdown

TINY = dict(hidden=64, intermediate=128, heads=4, vocab=97, rank=4, seq=16, steps=1, warmup=1, run_steps=20)


@pytest.fixture(scope="module")
def record():
    return run_bench(BenchSettings(layers=2, full_layers=3, **TINY), log=lambda _: None)


def test_rows_and_lamda_savings_against_lora(record):
    rows = record["rows"]
    assert set(rows) == {"full", "lora", "lora_fa", "lamda_b_trainable", "lamda_b_frozen", "lamdapp_b_frozen"}
    lora, frozen = rows["lora"]["totals"]["measured"], rows["lamda_b_frozen"]["totals"]["measured"]
    modules = 2 * 7
    assert frozen["trainable"] == frozen["updates_per_step"] == modules * 16
    assert frozen["optimizer_state_bytes"] == modules * 16 * 2 * 4  # AdamW: two fp32 moments of S
    assert frozen["grad_bytes"] == modules * 16 * 4
    assert frozen["saved_activation_bytes"] < lora["saved_activation_bytes"]
    assert rows["lamda_b_trainable"]["totals"]["measured"]["trainable"] > frozen["trainable"]
    assert record["ratios_vs_lora"]["lamda_b_frozen"]["measured.updates_per_step"] > 1
    assert frozen["run_updates"] < lora["run_updates"]


def test_extrapolation_equals_a_deeper_model(record):
    deeper = run_bench(
        BenchSettings(layers=3, full_layers=3, methods=("lora", "lamda"), **TINY), log=lambda _: None
    )
    for name in ("lora", "lamda_b_frozen"):
        extrapolated = record["rows"][name]["totals"]["extrapolated"]
        measured = deeper["rows"][name]["totals"]["measured"]
        for key in (
            "trainable",
            "updates_per_step",
            "param_bytes",
            "grad_bytes",
            "optimizer_state_bytes",
            "saved_activation_bytes",
        ):
            assert extrapolated[key] == measured[key], (name, key)


def test_markdown_cites_paper_claims(record):
    text = to_markdown(record)
    assert "17.7x" in text and "1.32x" in text and "abstract" in text
    assert "| lamda_b_frozen |" in text


def test_cli_writes_json_and_markdown(tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "bench" / "lamda_bench"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    args = parser.parse_args(
        ["bench-lamda", "--out", str(out), "--layers", "1", "--methods", "lora", "lamda", *flags]
    )
    assert args.func(args) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["settings"]["layers"] == 1 and "lamda_b_frozen" in data["rows"]
    assert out.with_suffix(".md").read_text().startswith("# LaMDA benchmark")


@pytest.mark.parametrize(
    "bad, match",
    [({"layers": 0}, "layers"), ({"methods": ("dora",)}, "dora"), ({"hidden": 65, "heads": 4}, "divisible")],
)
def test_bad_settings_raise_before_work(bad, match):
    with pytest.raises(BenchConfigError, match=match):
        run_bench(BenchSettings(**{**TINY, **bad}), log=lambda _: None)
