"""`snakemake -n` on the paper config lists the whole grid, the cluster profile resolves, and every
number of the Recursive Transformers paper's Tables F.1, G.2 and I.2 has a run that produces its
counterpart at the paper's setting."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from lamda_repro.claims import load_reference
from lamda_repro.recursive.runner import resolve_section, run_id, uptrain_config

REPO = Path(__file__).resolve().parents[1]
PAPER_CHECKPOINTS = {
    "Gemma": "google/gemma-2b",
    "TinyLlama": "TinyLlama/TinyLlama-1.1B-step-50K-105b",  # the 105B-token checkpoint (Table D.1)
    "Pythia": "EleutherAI/pythia-1b",
}


WORKFLOW_FILES = [
    *("Snakefile", "environment.yml", "workflow", "config", "profiles", "slurm", "results/reference"),
]


def _dry_run(*args):
    """`snakemake -n` in a fresh copy of the workflow: outputs an earlier run left in the checkout
    (e.g. `bash scripts/smoke.sh`) do not change what it lists, and it writes nothing there."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "snakemake", "-n", *args]
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


@pytest.fixture(scope="module")
def paper_dry_run():
    proc = _dry_run("--profile", "profiles/slurm", "--configfile", "config/paper.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def paper_config():
    return yaml.safe_load((REPO / "config" / "paper.yaml").read_text())


def test_paper_config_dry_run_lists_the_full_grid(paper_dry_run, paper_config):
    cfg = paper_config
    expected = sum(
        len(e["models"]) * len(e["tasks"]) * len(e["methods"]) * len(e.get("seeds", [0]))
        for e in cfg["experiments"].values()
    )
    counts = _job_counts(paper_dry_run)
    assert counts["finetune"] == expected
    assert counts["recursive_run"] == len(cfg["recursive"]["runs"])
    assert counts["bench"] == 1 and counts["aggregate"] == 1
    assert expected > 200  # eight GLUE tasks x 3 seeds and four more families


def test_smoke_config_dry_run_resolves_with_the_cluster_profile():
    proc = _dry_run("--quiet", "rules", "--profile", "profiles/slurm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _job_counts(proc.stdout + proc.stderr)["finetune"] > 0


# -- the recursive grid against the paper's tables ------------------------------------------------

B15, B60 = 15e9, 60e9
TABLES = ("F.1", "G.2", "I.2")


def _tokens(up) -> int:
    return 0 if up is None else up.steps * up.batch_size * up.grad_accum * up.seq_len


def _expected(cell) -> dict:
    """What the run behind a cell must be, read from the cell's table, row and column alone."""
    row, column, table = cell["row"], cell["column"], cell["table"]
    loops = 3 if "B=3" in row else 2
    want = {"checkpoint": PAPER_CHECKPOINTS[row.split()[0]], "num_loops": loops}
    budget, kd = (B60, "forward_kl") if table == "I.2" else (B15, None)
    if column == "full-size":
        tiny = row.startswith("TinyLlama")  # Table I.2 shows TinyLlama's original checkpoint
        return {**want, "variant": "original", "tokens": 0 if tiny else B60, "kd": None, "num_loops": None}
    want.update(tokens=budget, kd=kd)
    if column.startswith("reduced-size"):
        return {**want, "variant": "scratch"}
    if table == "G.2":
        init = re.search(r"(\w+) init$", row).group(1).lower()
        rank = int(re.search(r"r=(\d+)", column).group(1))
        return {
            **want,
            "variant": "recursive",
            "init": init,
            "rank": rank,
            "lora_init": "zero" if "zero" in column else "svd",
        }
    if column.startswith("relaxed"):
        rank = int(re.search(r"r=(\d+)", column).group(1))
        return {**want, "variant": "recursive", "init": "average", "rank": rank, "lora_init": "svd"}
    init = re.sub(r"recursive \((\w+)\)", r"\1", column).lower()
    return {**want, "variant": "recursive", "init": init, "rank": None, "lora_init": None}


def _actual(section, run) -> dict:
    up = uptrain_config(section, run)
    rank = run.get("lora_rank")
    return {
        "checkpoint": section["models"][run["model"]]["path"],
        "variant": run["variant"],
        "num_loops": run.get("num_loops"),
        "init": run.get("init", "stepwise") if run["variant"] == "recursive" else None,
        "rank": rank,
        "lora_init": run.get("lora_init", "svd") if rank else None,
        "sharing": run.get("sharing", "cycle"),
        "tokens": _tokens(up),
        "kd": up.kd_loss if up is not None and up.kd_weight > 0 else None,
    }


def test_every_cell_of_tables_f1_g2_i2_has_a_run_producing_its_counterpart(paper_dry_run, paper_config):
    section = resolve_section(paper_config["recursive"])
    runs = {run_id(r): r for r in section["runs"]}
    jobs = set(re.findall(r"wildcards: rec_run=(\S+)", paper_dry_run))
    cells = [c for c in load_reference(REPO / "results" / "reference" / "papers.yaml").recursive_cells]
    by_table = {t: [c for c in cells if c["table"] == t] for t in TABLES}
    # 4 rows x 5 columns (F.1); 5 init/model rows x 5 (G.2); 4 rows x 7 columns (I.2)
    assert [len(by_table[t]) for t in TABLES] == [20, 25, 28]
    tokens_per_step = 4 * 256 * 2048
    for cell in [c for t in TABLES for c in by_table[t]]:
        where = f"Table {cell['table']}, {cell['row']}, {cell['column']} -> {cell['run']}"
        assert cell["run"] in jobs, f"{where}: no such job in the dry run"
        want, run = _expected(cell), runs[cell["run"]]
        got = _actual(section, run)
        assert got["sharing"] == "cycle", where  # the paper's default sharing
        for key, value in want.items():
            if key == "tokens":
                # the paper's budget reached, by less than one step (~2M tokens) more
                assert value <= got["tokens"] < value + tokens_per_step or value == got["tokens"] == 0, where
            elif not (key == "num_loops" and value is None):
                assert got[key] == value, f"{where}: {key} {got[key]!r}, expected {value!r}"
        if want.get("kd"):  # the teacher: the full-size model uptrained on 15B tokens, kept on disk
            teacher = runs[f"{run['model']}--{run['teacher']}"]
            assert teacher["variant"] == "original" and teacher.get("save_model"), where
            assert B15 <= _tokens(uptrain_config(section, teacher)) < B15 + tokens_per_step, where
            assert uptrain_config(section, teacher).kd_weight == 0, where


def test_paper_recursive_settings_follow_appendix_e(paper_config):
    section = resolve_section(paper_config["recursive"])
    up15 = uptrain_config(section, {"name": "x", "model": "gemma-2b", "variant": "original", "budget": "15b"})
    up60 = uptrain_config(
        section, {"name": "x", "model": "gemma-2b", "variant": "original", "budget": "60b-kd"}
    )
    assert (up15.lr, up15.seq_len, up15.warmup_steps, up60.warmup_steps) == (2e-4, 2048, 200, 800)
    assert up15.precision == "bf16" and up60.kd_loss == "forward_kl" and up60.kd_weight > 0
    assert _tokens(up15) == 7153 * 2_097_152 and _tokens(up60) == 28611 * 2_097_152
    ev = section["eval"]
    assert ev["num_fewshot"] is None  # lm-eval's standard shot counts
    assert len(ev["tasks"]) == 7
    normalised = {t for t in ev["tasks"] if ev["metrics"][t] == "acc_norm"}
    assert normalised == set(ev["tasks"]) - {"lambada_openai", "winogrande"}
