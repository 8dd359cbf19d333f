"""`snakemake -n` on the paper config lists the whole grid, and the cluster profile resolves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


WORKFLOW_FILES = ["Snakefile", "environment.yml", "workflow", "config", "profiles", "results/reference"]


def _dry_run(*args):
    """`snakemake -n` in a fresh copy of the workflow: outputs an earlier run left in the checkout
    (e.g. `bash scripts/smoke.sh`) do not change what it lists, and it writes nothing there."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", *args]
    with tempfile.TemporaryDirectory(prefix="lamda-repro-dry-run-") as copy:
        for item in WORKFLOW_FILES:
            src, dst = REPO / item, Path(copy) / item
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        return subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=300)


def _job_counts(text):
    counts = {}
    for line in text.split("Job stats:", 1)[-1].splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def test_paper_config_dry_run_lists_the_full_grid():
    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    expected = sum(
        len(e["models"]) * len(e["tasks"]) * len(e["methods"]) * len(e.get("seeds", [0]))
        for e in cfg["experiments"].values()
    )
    proc = _dry_run("--profile", "profiles/slurm", "--configfile", "config/paper.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = _job_counts(proc.stdout + proc.stderr)
    assert counts["finetune"] == expected
    assert counts["recursive_run"] == len(cfg["recursive"]["runs"])
    assert counts["bench"] == 1 and counts["aggregate"] == 1
    assert expected > 200  # eight GLUE tasks x 3 seeds and four more families


def test_smoke_config_dry_run_resolves_with_the_cluster_profile():
    proc = _dry_run("--profile", "profiles/slurm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_counts(proc.stdout + proc.stderr)["finetune"] > 0
