"""One run end to end on a tiny model: the record, determinism and failures."""

from __future__ import annotations

import json

from conftest import tiny_bert_entry

from lamda_repro.config import TRAINING_DEFAULTS, RunSpec
from lamda_repro.train import run_finetune


def tiny_spec(method: dict, task_subset="sst2", data="sentiment", **training) -> RunSpec:
    tr = {
        **TRAINING_DEFAULTS,
        "epochs": 1,
        "batch_size": 16,
        "eval_batch_size": 32,
        "lr": 1e-3,
        "max_length": 32,
        "logging_steps": 2,
        **training,
    }
    return RunSpec(
        experiment="t",
        family="nlu",
        task=f"smoke_{task_subset}",
        task_params={"type": "glue", "subset": task_subset, "data": data},
        model="tiny-bert",
        model_params=tiny_bert_entry(),
        method=method["type"],
        method_type=method["type"],
        method_params=method,
        seed=0,
        training=tr,
    )


LORA = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}


def test_run_writes_a_complete_success_record(smoke_workdir, tmp_path):
    out = tmp_path / "rec.json"
    rec = run_finetune(tiny_spec(LORA), out, workdir=str(smoke_workdir), device="cpu", threads=1)
    assert rec["status"] == "success", rec["error"]
    on_disk = json.loads(out.read_text())
    assert on_disk["run_id"] == "t/smoke_sst2/tiny-bert/lora/seed0"
    assert on_disk["primary_metric"] == "accuracy"
    assert 0.0 <= on_disk["metrics"]["accuracy"] <= 1.0
    p = on_disk["params"]
    assert 0 < p["trainable"] < p["total"]
    steps = on_disk["throughput"]["train_steps"]
    assert steps == 4  # 64 examples / batch 16, one epoch
    # LoRA updates every trainable element at every step.
    assert on_disk["parameter_updates"] == steps * p["trainable"]
    mem = on_disk["memory"]
    assert mem["peak_kind"] == "cpu_rss" and mem["peak_bytes"] > 0
    assert mem["grad_bytes"] == 4 * p["trainable"]
    assert mem["saved_for_backward_bytes"] > 0
    assert mem["train_state_bytes"] == (
        mem["param_bytes"]
        + mem["grad_bytes"]
        + mem["optimizer_state_bytes"]
        + mem["saved_for_backward_bytes"]
    )
    assert on_disk["throughput"]["train_tokens"] > 0
    assert on_disk["env"]["versions"]["torch"]
    assert on_disk["wall_time_s"] > 0


def test_same_spec_gives_identical_metrics(smoke_workdir, tmp_path):
    spec = tiny_spec({"type": "full"}, task_subset="stsb", data="similarity", lr=1e-3)
    a = run_finetune(spec, tmp_path / "a.json", workdir=str(smoke_workdir), device="cpu", threads=1)
    b = run_finetune(spec, tmp_path / "b.json", workdir=str(smoke_workdir), device="cpu", threads=1)
    assert a["status"] == b["status"] == "success"
    assert a["metrics"] == b["metrics"]
    assert a["parameter_updates"] == b["parameter_updates"]


def test_nan_loss_leaves_a_failed_record(smoke_workdir, tmp_path):
    spec = tiny_spec({"type": "full"}, lr=1e38, max_grad_norm=0.0, epochs=3)
    out = tmp_path / "nan.json"
    rec = run_finetune(spec, out, workdir=str(smoke_workdir), device="cpu", threads=1)
    on_disk = json.loads(out.read_text())
    assert rec["status"] == on_disk["status"] == "failed"
    assert on_disk["error"].startswith("FloatingPointError: non-finite training loss")
    assert on_disk["metrics"] == {}


def test_missing_data_fails_with_a_record(tmp_path):
    spec = tiny_spec(LORA)
    rec = run_finetune(spec, tmp_path / "r.json", workdir=str(tmp_path), device="cpu")
    assert rec["status"] == "failed"
    assert "not built yet" in rec["error"] or "not found" in rec["error"]


def test_cli_run_exits_zero_on_failure_unless_strict(tmp_path, capsys):
    from lamda_repro.cli import main

    spec = json.dumps(tiny_spec(LORA).to_dict())
    args = [
        "run",
        "--spec",
        spec,
        "--out",
        str(tmp_path / "r.json"),
        "--workdir",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert "FAILED" in capsys.readouterr().err
    assert main(args + ["--strict"]) == 1


def test_cli_rejects_a_malformed_spec_in_one_line(tmp_path, capsys):
    from lamda_repro.cli import main

    out = tmp_path / "r.json"
    assert main(["run", "--spec", "{not json", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: --spec: not a run spec") and "\n" not in err
    assert main(["run", "--spec", '{"experiment": "x"}', "--out", str(out)]) == 2
    assert not out.exists()
