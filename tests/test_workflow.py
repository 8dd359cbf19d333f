"""The smoke workflow end to end through Snakemake (group `workflow`: minutes, not seconds).

Runs the default config (the smoke reproduction) in a copy of the workflow, then checks the
outputs, the HTML report, that a re-run does nothing, that deleting one record reruns only that
run and the aggregation, and that malformed configs stop Snakemake before any job runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]
COPY = ["Snakefile", "environment.yml", "workflow", "config", "profiles", "results/reference"]


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        env[v] = "1"
    return env


def snakemake(cwd, *args, timeout=1800):
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One real smoke reproduction with the default config."""
    root = tmp_path_factory.mktemp("wf")
    for item in COPY:
        src, dst = REPO / item, root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    proc = snakemake(root, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _jobs(dry_run_output: str) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run."""
    counts = {}
    block = dry_run_output.split("Job stats:", 1)[-1]
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_smoke_run_writes_tables_figures_claims_and_report(smoke_run):
    res = smoke_run / "results"
    for ext in ("md", "tex", "csv"):
        assert (res / "tables" / f"nlu.{ext}").stat().st_size > 0
    nlu = (res / "tables" / "nlu.md").read_text()
    assert "full" in nlu.lower() and "lora" in nlu.lower()
    assert "\\toprule" in (res / "tables" / "nlu.tex").read_text()
    assert list((res / "figures").glob("nlu_quality_vs_params.png"))
    assert (res / "claims.md").exists()
    proc = snakemake(smoke_run, "--report", "results/report.html")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (res / "report.html").stat().st_size > 10_000


def test_rerun_with_nothing_changed_runs_no_job(smoke_run):
    proc = snakemake(smoke_run, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_deleting_one_record_reruns_only_that_run_and_aggregation(smoke_run):
    records = sorted((smoke_run / "results" / "runs" / "nlu").rglob("*.json"))
    assert records
    records[0].unlink()
    proc = snakemake(smoke_run, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(proc.stdout + proc.stderr)
    assert jobs == {"finetune": 1, "aggregate": 1, "report_pages": 1, "all": 1}, jobs
    proc = snakemake(smoke_run, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records[0].exists()


BAD = [
    ({"methods": {"lora_r8": {"type": "lorra"}}}, "methods.lora_r8.type: unknown method type"),
    ({"methods": {"lora_r8": {"r": -1}}}, "methods.lora_r8.r: must be >= 1"),
    ({"experiments": {"nlu": {"tasks": ["missing_task"]}}}, "experiments.nlu.tasks[0]: unknown task"),
    ({"training": {"epochs": "x"}}, "training.epochs: expected number"),
    ({"bogus": 1}, "config: unknown key 'bogus'"),
]


@pytest.mark.parametrize("patch,message", BAD, ids=[m for _, m in BAD])
def test_malformed_config_stops_snakemake_before_any_job(smoke_run, tmp_path, patch, message):
    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    cfg = merge(yaml.safe_load((smoke_run / "config" / "config.yaml").read_text()), patch)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    before = {p: p.stat().st_mtime_ns for p in (smoke_run / "results").rglob("*") if p.is_file()}
    proc = snakemake(smoke_run, "--cores", "2", "--configfile", str(bad), "--forceall")
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("config error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in (smoke_run / "results").rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing removed
