"""`lamda-repro status`: done / failed / running / missing per experiment and stage."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

from lamda_repro.cli import main
from lamda_repro.results import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _setup(tmp_path):
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config.yaml")
    runs = tmp_path / "results" / "runs"
    write_json_atomic(runs / "nlu/smoke_sst2/minilm/lora_r8/seed0.json", {"status": "success"})
    write_json_atomic(
        runs / "nlu/smoke_sst2/minilm/full_ft/seed0.json",
        {"status": "failed", "error": "FloatingPointError: non-finite training loss (nan) at step 3\nmore"},
    )
    write_json_atomic(runs / "recursive/tiny--full.json", {"status": "success"})
    # Snakemake's mark of a job being made: the output path, base64, holding the cluster job id
    marker = tmp_path / ".snakemake" / "incomplete"
    marker.mkdir(parents=True)
    running = "results/runs/gsm8k/smoke_gsm8k/tiny_llama/lora_r8_all/seed0.json"
    (marker / base64.urlsafe_b64encode(running.encode()).decode()).write_text('{"external_jobid": "4711"}')


def test_status_counts_and_lists_failures_with_their_logs(tmp_path, capsys):
    _setup(tmp_path)
    assert main(["status", str(tmp_path / "config.yaml"), "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.split()[0].count("/") <= 1
    }
    assert rows["finetune/nlu"] == ["1", "1", "0", "2"]  # SST-2 x 4 methods
    assert rows["finetune/gsm8k"] == ["0", "0", "1", "2"]
    assert rows["recursive"] == ["1", "0", "0", "16"]
    assert rows["total"] == ["2", "1", "1", "36"]
    run = "nlu/smoke_sst2/minilm/full_ft/seed0"
    error = "FloatingPointError: non-finite training loss (nan) at step 3"
    assert f"FAILED  finetune/nlu {run}: {error} (log: logs/finetune/{run}.log)" in out
    assert "STALE" not in out
    assert "RUNNING finetune/gsm8k gsm8k/smoke_gsm8k/tiny_llama/lora_r8_all/seed0 (cluster job 4711)" in out


def test_failed_records_feed_forcerun(tmp_path, capsys):
    _setup(tmp_path)
    assert main(["status", str(tmp_path / "config.yaml"), "--root", str(tmp_path), "--failed-records"]) == 0
    assert capsys.readouterr().out.split() == ["results/runs/nlu/smoke_sst2/minilm/full_ft/seed0.json"]


def test_records_no_run_of_the_config_makes_are_listed_as_stale(tmp_path, capsys):
    _setup(tmp_path)
    runs = tmp_path / "results" / "runs"
    write_json_atomic(runs / "nlu/smoke_sst2/minilm/removed_method/seed0.json", {"status": "success"})
    write_json_atomic(runs / "nlu/smoke_sst2/minilm/lora_r8/seed0 copy.json", {"status": "success"})
    write_json_atomic(runs / "serving/serving.json", {"status": "success"})  # the serving benchmark's own
    assert main(["status", str(tmp_path / "config.yaml"), "--root", str(tmp_path)]) == 0
    stale = [line for line in capsys.readouterr().out.splitlines() if line.startswith("STALE")]
    assert stale == [
        "STALE   results/runs/nlu/smoke_sst2/minilm/lora_r8/seed0 copy.json",
        "STALE   results/runs/nlu/smoke_sst2/minilm/removed_method/seed0.json",
    ]
