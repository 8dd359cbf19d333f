"""Comparing the records of two workflow runs (lamda_repro/reproducible.py, compare-records)."""

from __future__ import annotations

import json

from lamda_repro.cli import main
from lamda_repro.reproducible import compare_record_trees

RECORD = {
    "run_id": "nlu/sst2/m/lora/seed0",
    "metrics": {"accuracy": 0.9375, "train_loss": 0.5},
    "memory": {"peak_bytes": 100, "peak_delta_bytes": 5, "grad_bytes": 64},
    "throughput": {"train_steps": 64, "train_time_s": 1.5, "train_tokens_per_s": 9.0},
    "started_at": "2026-12-02T10:00:00+00:00",
    "env": {"hardware": {"platform": "host-a"}, "git_revision": "abc"},
    "loops": [{"loop": 1, "share": 0.25, "latency_ms": 3.0}],
    "results": [{"scheduler": "cdb", "measured_repeats": [10.0], "simulated_vs_vanilla_static": 1.5}],
}


def _write(root, name, record):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _variant(**changes):
    rec = json.loads(json.dumps(RECORD))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = rec
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(last) if isinstance(node, list) else last] = value
    return rec


def test_readings_of_clock_and_machine_may_differ(tmp_path):
    _write(tmp_path / "a", "x/r.json", RECORD)
    changed = _variant(
        **{
            "memory.peak_bytes": 999,
            "throughput.train_time_s": 7.0,
            "throughput.train_tokens_per_s": 1.0,
            "started_at": "later",
            "env.hardware.platform": "host-b",
            "loops.0.latency_ms": 9.0,
            "results.0.measured_repeats": [11.0],
            "results.0.simulated_vs_vanilla_static": 1.6,
        }
    )
    _write(tmp_path / "b", "x/r.json", changed)
    assert compare_record_trees(tmp_path / "a", tmp_path / "b") == (1, [])


def test_results_and_exact_counts_may_not(tmp_path):
    _write(tmp_path / "a", "r.json", RECORD)
    for change, where in [
        ({"metrics.accuracy": 0.9374}, ".metrics.accuracy (0.9375 vs 0.9374)"),
        ({"memory.grad_bytes": 65}, ".memory.grad_bytes (64 vs 65)"),
        ({"throughput.train_steps": 63}, ".throughput.train_steps (64 vs 63)"),
        ({"loops.0.share": 0.5}, ".loops[0].share (0.25 vs 0.5)"),
        ({"results.0.scheduler": "csb"}, ".results[0].scheduler ('cdb' vs 'csb')"),
        ({"env.git_revision": "abd"}, ".env.git_revision ('abc' vs 'abd')"),
    ]:
        _write(tmp_path / "b", "r.json", _variant(**change))
        assert compare_record_trees(tmp_path / "a", tmp_path / "b") == (1, [f"r.json: differs at {where}"])


def test_missing_and_unreadable_records_are_named(tmp_path, capsys):
    _write(tmp_path / "a", "one.json", RECORD)
    _write(tmp_path / "a", "two.json", RECORD)
    _write(tmp_path / "b", "two.json", RECORD)
    (tmp_path / "b" / "three.json").write_text("{")
    count, problems = compare_record_trees(tmp_path / "a", tmp_path / "b")
    assert count == 1
    assert problems == [f"one.json: only in {tmp_path / 'a'}", f"three.json: only in {tmp_path / 'b'}"]
    assert main(["compare-records", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert main(["compare-records", str(tmp_path / "a"), str(tmp_path / "nope")]) == 2
    _write(tmp_path / "c", "one.json", RECORD)
    _write(tmp_path / "c", "two.json", _variant(**{"throughput.train_time_s": 3.0}))
    capsys.readouterr()
    assert main(["compare-records", str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.startswith("2 record(s): identical")
