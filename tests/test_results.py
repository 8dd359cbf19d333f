"""Run records are written atomically and keep the documented fields."""

from __future__ import annotations

import json
import math
import os

import pytest

from lamda_repro import results


def test_record_has_every_documented_field(tmp_path):
    rec = results.new_record("a/b", "finetune", {"x": 1})
    for key in (
        "schema_version",
        "run_id",
        "kind",
        "spec",
        "status",
        "error",
        "metrics",
        "primary_metric",
        "params",
        "parameter_updates",
        "memory",
        "throughput",
        "method_info",
        "wall_time_s",
        "started_at",
        "finished_at",
        "env",
    ):
        assert key in rec
    assert set(rec["env"]) == {"versions", "git_revision", "hardware"}


def test_write_record_is_strict_json_and_atomic(tmp_path):
    path = tmp_path / "runs" / "r.json"
    rec = results.new_record("r", "finetune", {})
    rec["status"] = "success"
    rec["metrics"] = {"acc": 0.5, "bad": float("nan")}
    results.write_record(path, rec)
    data = json.loads(path.read_text())
    assert data["metrics"] == {"acc": 0.5, "bad": None}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    results.write_json_atomic(path, {"old": True})

    class Boom:
        pass

    with pytest.raises(TypeError):
        results.write_json_atomic(path, {"new": Boom()})
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["r.json"]


def test_write_record_rejects_bad_status(tmp_path):
    rec = results.new_record("r", "finetune", {})
    rec["status"] = "maybe"
    with pytest.raises(ValueError, match="status"):
        results.write_record(tmp_path / "r.json", rec)


def _spec(kind, i):
    if kind == "finetune":
        return f"e/t/m/x{i}/seed0", {
            "experiment": "e",
            "task": "t",
            "model": "m",
            "method": f"x{i}",
            "seed": 0,
        }
    return f"tiny--r{i}", {"run": {"model": "tiny", "name": f"r{i}"}}


def test_find_records_filters_by_kind(tmp_path):
    for i, kind in enumerate(["finetune", "recursive", "finetune"]):
        rid, spec = _spec(kind, i)
        rec = results.new_record(rid, kind, spec)
        rec["status"] = "success"
        results.write_record(tmp_path / f"{results.record_stem(rec)}.json", rec)
    assert [r["run_id"] for r in results.find_records(tmp_path, "finetune")] == [
        "e/t/m/x0/seed0",
        "e/t/m/x2/seed0",
    ]
    assert len(results.find_records(tmp_path)) == 3
    assert math.isclose(len(results.find_records(tmp_path / "missing")), 0)
