"""Aggregation of partial grids: a family whose runs all failed shows its `failed` cells (and
empty figures) instead of stopping aggregation, and so does a grid in which nothing succeeded."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamda_repro.report_cli import aggregate, aggregate_outputs
from lamda_repro.results import RecordError, new_record, read_record, write_record

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "papers.yaml"
GRID = [("nlu", "sst2", "glue"), ("summarization", "xsum", "xsum")]
METHODS = [("lora_r8", "lora"), ("lamda_r8", "lamda")]


def _records(runs: Path, succeeded: set[tuple[str, str]]) -> list[Path]:
    """One record per (family, method) of GRID x METHODS; those in ``succeeded`` succeed, the
    others failed as a run writes them (every measured field empty)."""
    paths = []
    for family, task, task_type in GRID:
        for method, method_type in METHODS:
            spec = {
                "experiment": family,
                "family": family,
                "task": task,
                "task_params": {"type": task_type},
                "model": "m",
                "model_params": {"source": "hub", "id": "m"},
                "method": method,
                "method_type": method_type,
                "method_params": {"type": method_type, "r": 8},
                "seed": 0,
                "training": {},
                "generation": {},
                "scale": "smoke",
            }
            rec = new_record(f"{family}/{task}/m/{method}/seed0", "finetune", spec)
            if (family, method) in succeeded:
                rec.update(
                    status="success",
                    metrics={"accuracy": 0.9},
                    primary_metric="accuracy",
                    params={"trainable": 10, "total": 100},
                    parameter_updates=100,
                    memory={"peak_bytes": 1, "peak_kind": "cpu_rss", "saved_for_backward_bytes": 2},
                    throughput={"train_samples_per_s": 1.0, "train_time_s": 1.0},
                )
            else:
                rec["error"] = "ValueError: a bad value"
            paths.append(runs / f"{rec['run_id']}.json")
            write_record(paths[-1], rec)
    return paths


def _table_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("| ") and "this suite" in line]


@pytest.mark.parametrize(
    "succeeded",
    [{("nlu", "lora_r8")}, set()],
    ids=["one-family-all-failed", "nothing-succeeded"],
)
def test_failed_families_render_failed_cells(tmp_path, succeeded):
    paths = _records(tmp_path / "runs", succeeded)
    families = [family for family, _, _ in GRID]
    written = aggregate(tmp_path / "runs", None, REFERENCE, tmp_path / "out", families, paths)
    assert sorted(written) == sorted(aggregate_outputs(tmp_path / "out", families))
    assert all(Path(p).stat().st_size > 0 for p in written)
    rows = _table_rows(tmp_path / "out" / "tables" / "summarization.md")
    assert len(rows) == 2 and all(row.count("| failed |") >= 1 for row in rows)
    nlu = {row.split(" | ")[2]: row for row in _table_rows(tmp_path / "out" / "tables" / "nlu.md")}
    assert "| failed |" in nlu["lamda_r8"]
    assert ("| failed |" in nlu["lora_r8"]) == (("nlu", "lora_r8") not in succeeded)


def test_damaged_record_error_names_the_config_files(tmp_path):
    path = tmp_path / "runs" / "nlu" / "sst2" / "m" / "lora_r8" / "seed0.json"
    path.parent.mkdir(parents=True)
    path.write_text("{")
    with pytest.raises(RecordError) as err:
        read_record(path, tmp_path / "runs", ["config/paper.yaml", "my site.yaml"])
    rerun = f"snakemake --cores all --configfile config/paper.yaml 'my site.yaml' --force {path}"
    assert rerun in str(err.value)
