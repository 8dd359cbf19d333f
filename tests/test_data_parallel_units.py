"""The pure parts of several-process fine-tuning (fast; the runs themselves are in
tests/test_distributed_finetune.py): steps per run, which losses the Trainer may rescale, and the
multi-node launch line and SLURM request."""

from __future__ import annotations

import torch
from test_lamda_helpers import tiny_bert_cls, tiny_llama, token_batch

from lamda_repro.cluster import launcher, multinode_resources
from lamda_repro.config import TRAINING_DEFAULTS
from lamda_repro.train import _total_steps, loss_uses_item_count


def test_steps_per_run_divide_by_the_processes():
    tr = {**TRAINING_DEFAULTS, "batch_size": 4, "grad_accum": 1, "epochs": 2}
    assert _total_steps(24, tr) == 12 and _total_steps(24, tr, processes=2) == 6
    assert _total_steps(25, {**tr, "grad_accum": 2}, processes=2) == 4  # ceil(ceil(25 / 8) / 2) x 2


def test_a_mean_loss_ignores_the_item_count_and_a_causal_lm_loss_uses_it():
    x = token_batch()
    assert not loss_uses_item_count(tiny_bert_cls(), {"input_ids": x, "labels": torch.tensor([0, 1])})
    assert loss_uses_item_count(tiny_llama(), {"input_ids": x, "labels": x})


def test_launch_line_and_request_of_two_nodes_with_four_gpus():
    one_node = {"gpus": 4}
    two_nodes = {"gpus": 4, "nodes": 2}
    assert launcher(one_node, "cuda") == "torchrun --standalone --nproc-per-node=4 --no-python"
    line = launcher(two_nodes, "cuda", cpus_per_gpu=6)
    assert line.startswith(
        "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=24 --kill-on-bad-exit=1 torchrun "
    )
    assert "--nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d" in line and line.endswith(" --no-python")
    assert '--rdzv-endpoint="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)":29500' in line
    assert launcher(two_nodes, "cpu") == "" and launcher({"nodes": 1}, "cuda") == ""
    res = multinode_resources({"gpu_model": "h100", "slurm_extra": "--signal=TERM@600"}, lambda w: w)
    got = {key: value(two_nodes) for key, value in res.items() if callable(value)}
    assert got == {
        "nodes": 2, "gpu": 0, "gres": "gpu:h100:4", "tasks": 2, "mpi": "srun", "gpu_model": "",
        "slurm_extra": "--signal=TERM@600 --ntasks-per-node=1",
    }  # fmt: skip
    single = {key: value(one_node) for key, value in res.items() if callable(value)}
    assert single["gpu"] == 4 and single["nodes"] == 1 and single["gres"] == single["mpi"] == ""
    assert single["gpu_model"] == "h100" and res["tasks_per_gpu"] == 0


def test_fsdp_on_cpu_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch):
    from test_train import LORA, tiny_spec

    from lamda_repro.train import run_finetune

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; rank 0 writes the record
    monkeypatch.delenv("RANK", raising=False)
    spec = tiny_spec(LORA, gpus=2, distributed="fsdp")
    record = run_finetune(spec, tmp_path / "rec.json", str(tmp_path / "nowhere"), device="cpu")
    assert record["status"] == "failed" and "\n" not in record["error"]
    assert record["error"].startswith("ValueError: training.distributed: fsdp needs CUDA devices")
    assert not (tmp_path / "nowhere").exists()  # no data read, no checkpoint folder
