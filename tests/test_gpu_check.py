"""scripts/gpu_check.sh end to end on a CPU with the tiny geometries: it writes the layer latency
tables, the engine check and the LaMDA benchmark record, and the tables read them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lamda_repro import claims
from lamda_repro.recursive.serving.config import PAPER_ESTIMATE_DEFAULTS
from lamda_repro.recursive.serving.paper import paper_estimate
from lamda_repro.recursive.serving.report import write_serving_table
from lamda_repro.recursive.serving.simulator import LatencyTables

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[v] = "1"
    return env


def test_gpu_check_script_runs_on_cpu_with_the_tiny_geometry(tmp_path):
    cmd = [
        "bash",
        str(REPO / "scripts" / "gpu_check.sh"),
        "--tiny",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # 1. the layer tables: a latency-table file the paper estimate and the serving table read
    table_file = json.loads((tmp_path / "latency" / "tiny.cpu.json").read_text())
    assert table_file["geometry"] == "tiny" and set(table_file["tables"]) == {"plain", "lora_r4"}
    plain = LatencyTables.from_dict(table_file["tables"]["plain"])
    assert plain.block.sizes == [1, 2, 4] and all(t > 0 for t in plain.block.seconds)
    assert LatencyTables.from_dict(table_file["tables"]["lora_r4"]).block_mixed is not None
    cfg = {
        **PAPER_ESTIMATE_DEFAULTS,
        "memory_budget_gb": 0.001,
        "lora_ranks": [4],
        "workload": {"num_requests": 6, "prompt_len": 16, "gen_len": 8},
    }
    estimate = paper_estimate(cfg, table_file, [0.5, 0.5], "test")
    assert estimate["latency_device"].startswith("cpu") and estimate["speedup_cdb_exit_vs_vanilla_static"] > 0
    frame = write_serving_table(
        {"status": "success", "results": [], "paper_estimate": estimate}, tmp_path / "t"
    )
    assert len(frame) == len(estimate["rows"]) == 14

    # 2. the engine check: measured and simulated tokens/s per scheduler
    engine = json.loads((tmp_path / "gpu_check" / "engine.cpu.json").read_text())
    assert [(r["scheduler"], r["early_exit"]) for r in engine["rows"]] == [
        ("static", False),
        ("csb", False),
        ("cdb", False),
        ("cdb", True),
    ]
    assert all(r["measured_tokens_per_s"] > 0 and r["simulated_tokens_per_s"] > 0 for r in engine["rows"])
    assert engine["workload"]["decode_tokens"] > 0 and engine["device"].startswith("cpu")

    # 3. the LaMDA benchmark record where the report's --bench-dir finds it
    bench, note = claims.load_bench(tmp_path / "bench")
    assert bench is not None, note
    assert set(claims.bench_memory_ratios(bench)) and (tmp_path / "bench" / "lamda_bench.md").is_file()
