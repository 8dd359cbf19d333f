"""What a fine-tuning run may resume, seen from the user's side: a run resumes only checkpoints of
its own identity (spec, data and model files, code version), a damaged checkpoint falls back to
the previous one, two configs sharing a workdir keep their own checkpoints, and nothing outside
the run's own checkpoint folder is ever deleted. Every rerun's record is compared with a clean
run's."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
from test_train import LORA, tiny_spec

import lamda_repro.train as train
from lamda_repro.resume import (
    MARKER,
    Preempted,
    complete_checkpoints,
    read_marker,
    remove_checkpoint,
    rotate_checkpoints,
    write_marker,
)
from lamda_repro.tasks.smoke import write_dataset

SPEC_A = tiny_spec(LORA, epochs=1, save_steps=2)  # 4 steps: checkpoints 2 and 4
SPEC_B = tiny_spec(LORA, epochs=1, save_steps=2, lr=3e-3)  # the same run id, another config


def _workdir(root: Path, smoke_workdir: Path, data_seed: int = 0) -> Path:
    """A workdir of its own: the smoke workdir's model, and its sentiment data (data_seed 0) or
    data generated with another seed."""
    root.mkdir(parents=True)
    (root / "models").symlink_to(smoke_workdir / "models")
    if data_seed == 0:
        shutil.copytree(smoke_workdir / "data", root / "data")
    else:
        _write_sentiment(root, data_seed)
    return root


def _write_sentiment(wd: Path, seed: int) -> None:
    shutil.rmtree(wd / "data" / "sentiment", ignore_errors=True)
    write_dataset(
        {"generator": "sentiment", "n_train": 64, "n_eval": 32, "seed": seed}, wd / "data" / "sentiment"
    )


def _run(spec, wd: Path) -> dict:
    return train.run_finetune(spec, wd / "record.json", workdir=str(wd), device="cpu", threads=1)


def _run_dir(wd: Path, spec) -> Path:
    return wd / "checkpoints" / spec.run_id


def _ckpt(wd: Path, spec, step: int) -> Path:
    (folder,) = _run_dir(wd, spec).glob("id-*")
    return folder / f"checkpoint-{step}"


def _assert_same_outputs(rec: dict, ref: dict) -> None:
    assert rec["status"] == ref["status"] == "success", rec["error"]
    assert rec["identity"] == ref["identity"]
    metrics, expected = dict(rec["metrics"]), dict(ref["metrics"])
    assert metrics.pop("train_loss") == pytest.approx(expected.pop("train_loss"), rel=1e-9)
    assert metrics == expected
    assert rec["parameter_updates"] == ref["parameter_updates"]
    assert rec["throughput"]["train_steps"] == ref["throughput"]["train_steps"]


@pytest.fixture(scope="module")
def clean_a(smoke_workdir, tmp_path_factory):
    """SPEC_A run once in a fresh workdir: (its workdir, its record)."""
    wd = _workdir(tmp_path_factory.mktemp("clean") / "wd", smoke_workdir)
    rec = _run(SPEC_A, wd)
    assert rec["status"] == "success" and rec["resume"]["resumed"] == 0
    return wd, rec


def _copy_of(clean, dest: Path) -> Path:
    wd, _ = clean
    shutil.copytree(wd, dest, symlinks=True)
    return dest


def test_changed_data_settings_start_afresh_and_match_a_clean_run(clean_a, smoke_workdir, tmp_path, caplog):
    # the user changes data.sentiment.seed: prepare_data rewrites the data, the run reruns
    wd = _copy_of(clean_a, tmp_path / "wd")
    old = _ckpt(wd, SPEC_A, 4)
    _write_sentiment(wd, seed=1)
    with caplog.at_level(logging.INFO, logger="lamda_repro"):
        rec = _run(SPEC_A, wd)
    assert rec["resume"] == {"resumed": 0, "from_step": None}
    assert "resuming" not in caplog.text
    assert rec["identity"]["digest"] != clean_a[1]["identity"]["digest"]
    assert read_marker(old) is not None  # the old data's checkpoints are kept, in their own folder
    reference = _run(SPEC_A, _workdir(tmp_path / "clean", smoke_workdir, data_seed=1))
    _assert_same_outputs(rec, reference)


def test_damaged_checkpoint_falls_back_to_the_previous_one(clean_a, tmp_path, caplog):
    wd = _copy_of(clean_a, tmp_path / "wd")
    weights = _ckpt(wd, SPEC_A, 4) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # same size, other bytes
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="lamda_repro"):
        rec = _run(SPEC_A, wd)
    assert "adapter_model.safetensors: not the bytes its marker lists" in caplog.text
    assert rec["resume"] == {"resumed": 1, "from_step": 2}
    _assert_same_outputs(rec, clean_a[1])

    # a checkpoint whose marker matches its files but that does not load (written damaged):
    # the run sets it aside and falls back to the previous one
    ckpt = _ckpt(wd, SPEC_A, 4)
    marker = json.loads((ckpt / MARKER).read_text())
    (ckpt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    write_marker(ckpt, {k: v for k, v in marker.items() if k != "files"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lamda_repro"):
        rec = _run(SPEC_A, wd)
    assert f"loading checkpoint {ckpt} failed" in caplog.text and "falling back" in caplog.text
    assert rec["resume"] == {"resumed": 1, "from_step": 2}
    _assert_same_outputs(rec, clean_a[1])
    assert list((ckpt.parent / "set-aside").iterdir())  # kept for a look, out of the way


def test_two_configs_in_one_workdir_keep_their_own_checkpoints(clean_a, smoke_workdir, tmp_path, monkeypatch):
    wd = _workdir(tmp_path / "wd", smoke_workdir)
    # config A is preempted at step 2 (SIGTERM: checkpoint, no record) ...
    make = train._make_checkpoint_callback

    def preempted_at_step_2(*args):
        cb = make(*args)
        step_end = cb.on_step_end

        def on_step_end(a, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_end(a, state, control, **kw)

        cb.on_step_end = on_step_end
        return cb

    monkeypatch.setattr(train, "_make_checkpoint_callback", preempted_at_step_2)
    with pytest.raises(Preempted):
        _run(SPEC_A, wd)
    monkeypatch.setattr(train, "_make_checkpoint_callback", make)
    # ... config B (same run id, same workdir) runs meanwhile ...
    rec_b = _run(SPEC_B, wd)
    assert rec_b["resume"]["resumed"] == 0
    # ... and A's retry resumes its own checkpoint
    rec_a = _run(SPEC_A, wd)
    assert rec_a["resume"] == {"resumed": 1, "from_step": 2}
    _assert_same_outputs(rec_a, clean_a[1])
    reference_b = _run(SPEC_B, _workdir(tmp_path / "clean_b", smoke_workdir))
    _assert_same_outputs(rec_b, reference_b)
    assert len(list(_run_dir(wd, SPEC_A).glob("id-*"))) == 2


def _outside(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder outside the project that looks like a run's checkpoints (one incomplete, two
    complete of another run), and its files' contents."""
    outside = tmp_path / "outside"
    for step in (1, 2, 3):
        (outside / f"checkpoint-{step}").mkdir(parents=True)
        (outside / f"checkpoint-{step}" / "weights.bin").write_bytes(b"precious %d" % step)
        if step > 1:
            write_marker(outside / f"checkpoint-{step}", {"step": step, "spec_digest": "other"})
    return outside, {str(p): p.read_bytes() for p in outside.rglob("*") if p.is_file()}


def test_symlinked_checkpoint_folders_are_never_followed(smoke_workdir, tmp_path, caplog):
    outside, before = _outside(tmp_path)
    wd = _workdir(tmp_path / "wd", smoke_workdir)
    identity = train.run_identity(SPEC_B, str(wd))["digest"]
    own = _run_dir(wd, SPEC_B) / f"id-{identity}"
    own.parent.mkdir(parents=True)
    own.symlink_to(outside, target_is_directory=True)  # the run's own folder is a link out
    with caplog.at_level(logging.INFO, logger="lamda_repro"):
        rec = _run(SPEC_B, wd)
    assert rec["status"] == "success" and rec["resume"]["resumed"] == 0
    assert "a symbolic link where the run's checkpoint folder belongs" in caplog.text
    assert not own.is_symlink() and own.is_dir()
    assert {str(p): p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before

    # links inside the run's own folder are neither resumed nor deleted
    for step in (9, 10):
        (own / f"checkpoint-{step}").symlink_to(outside / "checkpoint-2", target_is_directory=True)
    assert [p.name for p, _ in complete_checkpoints(own, identity)] == ["checkpoint-4", "checkpoint-2"]
    rotate_checkpoints(own, keep=1)
    assert not remove_checkpoint(own / "checkpoint-9", own)
    assert not remove_checkpoint(outside / "checkpoint-3", own)
    assert [p.name for p in sorted(own.iterdir())] == ["checkpoint-10", "checkpoint-4", "checkpoint-9"]
    assert {str(p): p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before


def test_a_model_rebuilt_with_the_same_files_is_the_same_input(tmp_path):
    from lamda_repro.resume import folder_digest

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "pretrain.json").write_text('{"stats": {"train_time_s": 1.0}}')
    digest = folder_digest(model)
    (model / "pretrain.json").write_text('{"stats": {"train_time_s": 2.0}}')  # a reading of the clock
    assert folder_digest(model) == digest
    (model / "model.safetensors").write_bytes(b"weighs")
    assert folder_digest(model) != digest
    assert folder_digest(tmp_path / "absent") != folder_digest(tmp_path / "absent2")
