"""The early-exit and serving jobs end to end on a tiny setup (group `slow`)."""

import json
import shutil

import pytest

from lamda_repro.recursive import runner
from lamda_repro.recursive.serving.config import resolve_serving
from lamda_repro.recursive.serving.jobs import execute_early_exit, execute_serving
from lamda_repro.recursive.serving.report import write_serving_table
from lamda_repro.results import write_record

pytestmark = pytest.mark.slow

SECTION = {
    "seed": 0,
    "corpus": {"kind": "smoke", "num_documents": 200, "num_validation": 40, "task_test_size": 8},
    "models": {
        "tiny": {
            "pretrain": {
                "hidden_size": 32,
                "num_layers": 4,
                "num_heads": 4,
                "num_kv_heads": 2,
                "intermediate_size": 64,
                "steps": 40,
                "batch_size": 8,
                "seq_len": 32,
                "lr": 0.01,
            }
        }
    },  # fmt: skip
    "uptrain": {"steps": 4, "batch_size": 8, "seq_len": 32, "warmup_steps": 1},
    "eval": {
        "tasks": ["smoke_facts"],
        "num_fewshot": 0,
        "batch_size": 16,
        "ppl_batches": 1,
        "ppl_seq_len": 32,
    },
    "runs": [
        {"name": "full", "model": "tiny", "variant": "original"},
        {"name": "rt", "model": "tiny", "variant": "recursive", "num_loops": 2, "early_exit": True},
        {
            "name": "rrt",
            "model": "tiny",
            "variant": "recursive",
            "num_loops": 2,
            "lora_rank": 2,
            "early_exit": {"kv_policy": "copy_kv"},
        },
    ],  # fmt: skip
    "early_exit": {
        "steps": 4,
        "batch_size": 8,
        "seq_len": 32,
        "thresholds": [0.5, 0.9],
        "eval_batch_size": 4,
        "eval_seq_len": 16,
        "eval_limit": 4,
    },  # fmt: skip
    "serving": {
        "vanilla": "tiny--full",
        "runs": ["tiny--rt", "tiny--rrt"],
        "threshold": 0.5,
        "max_batch": 4,
        "memory_budget_mb": 1.0,
        "repeats": 1,
        "workload": {"num_requests": 6, "prompt_len": [3, 6], "gen_len": [2, 8]},
        "latency": {"repeats": 1, "warmup": 0},
        "paper_estimate": {
            "latency_tables": "results/reference/latency/gemma-2b.cpu.json",
            "roofline": ["a100-40gb"],
            "lora_ranks": [64],
            "workload": {"num_requests": 20, "prompt_len": 512, "gen_len": 16},
        },
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    section = runner.resolve_section(SECTION)
    resolve_serving(section)
    runner.prepare_corpus(section, work)
    runner.tokenize_corpus(section, "corpus", work)
    runner.pretrain_model(section, "tiny", work, runner.pick_device("cpu"))
    records = {}
    for rid in ("tiny--full", "tiny--rt", "tiny--rrt"):
        record = runner.execute_run(section, rid, work, "cpu")
        assert record["status"] == "success", record.get("error")
        records[rid] = work / f"{rid}.json"
        write_record(records[rid], record)
    return section, work, records


def test_early_exit_and_serving_jobs_write_their_records(setup, tmp_path):
    section, work, records = setup
    ee = {}
    for rid in ("tiny--rt", "tiny--rrt"):
        record = execute_early_exit(section, rid, work, records[rid], "cpu")
        assert record["status"] == "success", record.get("error")
        assert [p["rule"] for p in record["sweep"]] == ["none", "oracle", "confidence", "confidence"]
        assert all(abs(sum(p["exit_distribution"]) - 1) < 1e-9 for p in record["sweep"])
        ee[rid] = tmp_path / f"{rid}.json"
        write_record(ee[rid], record)
    serving = execute_serving(section, work, {k: str(v) for k, v in ee.items()}, records["tiny--full"], "cpu")
    assert serving["status"] == "success", serving.get("error")
    assert all(serving["greedy_outputs_match"].values())
    rows = serving["results"]
    assert len(rows) == 2 + 6 + 6
    assert all(r["max_call_size"] <= r["max_batch"] <= 4 for r in rows)
    assert all(r["prediction_error"] is not None for r in rows)
    vanilla_batch = serving["models"]["tiny--full"]["max_batch"]
    assert vanilla_batch <= serving["models"]["tiny--rt"]["max_batch"]  # half the layer weights
    assert serving["paper_estimate"]["models"]["recursive"]["max_batch"] > 0
    assert serving["metrics"]["cdb_exit_speedup_measured"] > 0
    json.dumps(serving)  # a plain JSON record
    frame = write_serving_table(serving, tmp_path / "serving")
    (roofline,) = serving["paper_roofline"]
    assert roofline["accelerator"]["key"] == "a100-40gb" and roofline["estimate"] == "roofline estimate"
    speedup = roofline["speedup_cdb_exit_vs_vanilla_static"]
    assert serving["metrics"]["paper_roofline_speedup_a100_40gb"] == speedup
    assert len(frame) == len(rows) + len(serving["paper_estimate"]["rows"]) + len(roofline["rows"])


def test_a_missing_model_folder_fails_the_job_with_its_reason(setup, tmp_path):
    section, work, records = setup
    record = json.loads(records["tiny--rt"].read_text())
    moved = tmp_path / "moved"
    shutil.move(record["artifacts"]["model_dir"], moved)
    try:
        failed = execute_early_exit(section, "tiny--rt", work, records["tiny--rt"], "cpu")
    finally:
        shutil.move(moved, record["artifacts"]["model_dir"])
    assert failed["status"] == "failed" and "names no saved model" in failed["error"]
