"""Recursive uptraining with KD and early-exit post-training on torch.distributed (group
`distributed`): two processes (torchrun, gloo, CPU) against one process with the same global
batch, the record of the stage's job written once, a SIGKILLed two-process run resumed, and
uptraining under FSDP (sharded student) against one process and resumed from its checkpoint.

Three torchrun launches in all, shared by the tests through one module fixture."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lamda_repro.recursive import runner
from lamda_repro.recursive.tiny import tiny_causal_lm
from lamda_repro.warm import ENV_SWITCH

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("distributed_recursive_worker.py")
SECTION = {
    "corpus": {"num_documents": 300, "num_validation": 20, "task_test_size": 8},
    "models": {},  # filled in: the tiny model saved by the fixture
    "uptrain": {"steps": 2, "batch_size": 4, "seq_len": 16, "kd_weight": 0.5, "warmup_steps": 1},
    "eval": {
        "tasks": ["smoke_facts"],
        "limit": 8,
        "batch_size": 8,
        "ppl_batches": 1,
        "ppl_batch_size": 2,
        "ppl_seq_len": 16,
        "throughput_batch_size": 1,
        "throughput_seq_len": 8,
    },
    "runs": [{"name": "rrt", "model": "tiny", "variant": "recursive", "num_loops": 2, "lora_rank": 2}],
}


def _torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    env.pop(ENV_SWITCH, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(command + [str(WORKER), *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    from transformers import AutoTokenizer

    section = {**SECTION, "models": {"tiny": {"path": str(work / "base")}}}
    (work / "base").mkdir()  # filled below, once the corpus's tokenizer exists
    resolved = runner.resolve_section(section)
    runner.prepare_corpus(resolved, work)
    tokenizer = AutoTokenizer.from_pretrained(runner.corpus_dir(work) / "tokenizer")
    torch.manual_seed(0)
    model = tiny_causal_lm(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    key = runner.tokenizer_key(resolved, "tiny")
    runner.tokenize_corpus(resolved, key, work)
    tokens = runner.tokens_root(work) / key
    common = ["--base", str(work / "base"), "--tokens", str(tokens)]
    job = json.dumps({"section": section, "run": "tiny--rrt", "workdir": str(work)})
    runs = {
        "two": _torchrun([*common, "--out", str(work / "two"), "--cli-run", job, "--fsdp"], work),
        "killed": _torchrun([*common, "--out", str(work / "resumed"), "--kill-at", "2"], work),
    }
    runs["resumed"] = _torchrun([*common, "--out", str(work / "resumed")], work)
    return work, tokens, runs


def _weights(folder, stage, rank):
    return load_file(folder / f"{stage}-rank{rank}.safetensors")


@functools.cache
def _one_process(work, tokens):
    import importlib.util

    spec = importlib.util.spec_from_file_location("distributed_recursive_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker.train(work / "base", tokens, work / "one-process-checkpoints")


@pytest.mark.parametrize("stage", ["uptrain", "early_exit"])
def test_two_processes_train_identical_replicas_equal_to_one_process(launched, stage):
    work, tokens, runs = launched
    assert runs["two"].returncode == 0, runs["two"].stderr[-3000:]
    rank0, rank1 = _weights(work / "two", stage, 0), _weights(work / "two", stage, 1)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "replicas differ"
    up, stats, ee, ee_stats = _one_process(work, tokens)
    single = up if stage == "uptrain" else ee
    worst = max((rank0[k] - single[k]).abs().max().item() for k in rank0)
    # Float sums in another order (two half-batch means averaged, not one mean) differ by ~1e-7 in
    # the gradients; AdamW's normalised steps at lr 0.01 carry that to ~1e-5 in weights of ~0.1.
    assert worst < 1e-4, f"{stage}: 2 processes vs 1 differ by {worst}"
    moved = max((single[k] - up[k]).abs().max().item() for k in up) if stage == "early_exit" else 1
    assert moved > 0  # early-exit post-training changed the uptrained weights
    two = json.loads((work / "two" / "stats-rank0.json").read_text())[stage]
    one = stats if stage == "uptrain" else ee_stats
    assert two["tokens"] == one["tokens"]
    assert abs(two["final_loss"] - one["final_loss"]) < 1e-5


def test_the_stage_job_writes_its_record_once(launched):
    work, _, runs = launched
    assert runs["two"].returncode == 0, runs["two"].stderr[-3000:]
    assert not (work / "two" / "record-rank1.json").exists()
    record = json.loads((work / "two" / "record-rank0.json").read_text())
    assert record["status"] == "success", record.get("error")
    assert record["tokens_seen"] == 2 * 4 * 16  # the global batch, not one rank's share


def test_a_killed_two_process_run_resumes_and_ends_as_the_uninterrupted_one(launched):
    work, _, runs = launched
    assert runs["killed"].returncode != 0
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    stats = json.loads((work / "resumed" / "stats-rank0.json").read_text())["uptrain"]
    assert stats["resumed"] == 1 and stats["resumed_from_step"] == 2
    for stage in ("uptrain", "early_exit"):
        resumed, uninterrupted = _weights(work / "resumed", stage, 0), _weights(work / "two", stage, 0)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), stage


def test_fsdp_uptraining_equals_one_process_and_resumes_from_its_checkpoint(launched):
    work, tokens, runs = launched
    assert runs["two"].returncode == 0, runs["two"].stderr[-3000:]
    sharded, resumed = (
        load_file(work / "two" / "fsdp.safetensors"),
        load_file(work / "two" / "fsdp-resumed.safetensors"),
    )
    first, second = json.loads((work / "two" / "fsdp-stats.json").read_text())
    assert second["resumed"] == 1 and second["resumed_from_step"] == 2
    assert all(torch.equal(sharded[k], resumed[k]) for k in sharded)
    single = _one_process(work, tokens)[0]
    worst = max((sharded[k] - single[k]).abs().max().item() for k in single)
    assert worst < 1e-4, f"FSDP vs 1 process: {worst}"
    assert first["tokens"] == 4 * 2 * 4 * 16
