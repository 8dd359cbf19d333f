"""Distillation losses and the uptraining loop."""

import itertools

import pytest
import torch

from lamda_repro.recursive.convert import convert_to_recursive, decoder_layers
from lamda_repro.recursive.distill import DistillConfigError, combined_loss, distillation_loss
from lamda_repro.recursive.tiny import tiny_causal_lm
from lamda_repro.recursive.uptrain import UptrainConfig, lr_factor, train_causal_lm


def _logits(seed):
    return torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_losses_are_zero_for_equal_and_positive_for_different_distributions(kind):
    a, b = _logits(0), _logits(1)
    assert distillation_loss(a, a.clone(), kind).abs() < 1e-6
    assert distillation_loss(a, b, kind) > 1e-3


def test_forward_and_reverse_kl_match_torch_kl_div():
    student, teacher = _logits(0), _logits(1)
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    forward = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="sum") / 10
    reverse = torch.nn.functional.kl_div(log_t, log_s, log_target=True, reduction="sum") / 10
    assert torch.allclose(distillation_loss(student, teacher, "forward_kl"), forward, atol=1e-6)
    assert torch.allclose(distillation_loss(student, teacher, "reverse_kl"), reverse, atol=1e-6)
    assert not torch.allclose(forward, reverse)


def test_jsd_and_tv_are_symmetric_and_bounded():
    a, b = _logits(2), _logits(3)
    for kind, bound in (("jsd", torch.log(torch.tensor(2.0))), ("tv", torch.tensor(1.0))):
        assert torch.allclose(distillation_loss(a, b, kind), distillation_loss(b, a, kind), atol=1e-6)
        assert distillation_loss(a * 50, -b * 50, kind) <= bound + 1e-5


def test_mask_selects_positions():
    a, b = _logits(4), _logits(5)
    mask = torch.zeros(2, 5)
    mask[0, 1] = 1
    expected = distillation_loss(a[:1, 1:2], b[:1, 1:2], "forward_kl")
    assert torch.allclose(distillation_loss(a, b, "forward_kl", mask=mask), expected, atol=1e-6)


def test_combined_loss_weights_and_errors():
    lm, kd = torch.tensor(2.0), torch.tensor(4.0)
    assert combined_loss(lm, kd, 0.25) == 0.75 * 2 + 0.25 * 4
    assert combined_loss(lm, None, 0.5) == lm
    with pytest.raises(DistillConfigError, match="kd_weight"):
        combined_loss(lm, kd, 1.5)
    with pytest.raises(DistillConfigError, match="kd loss"):
        distillation_loss(_logits(0), _logits(1), "cross")


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = UptrainConfig(steps=20, warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0
    assert all(x >= y for x, y in itertools.pairwise(factors[4:])) and abs(factors[20] - 0.1) < 1e-9


def _batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, 20, (4, 1), generator=gen)
        yield (start + torch.arange(12)) % 32  # counting sequences: learnable


def _run(kd_weight, seed=0, steps=15):
    torch.manual_seed(0)
    teacher = tiny_causal_lm(
        "llama",
        vocab_size=32,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
    )
    student = convert_to_recursive(teacher, num_loops=2, init="average", lora_rank=2)
    cfg = UptrainConfig(steps=steps, batch_size=4, seq_len=12, lr=1e-2, warmup_steps=2, kd_weight=kd_weight)
    stats = train_causal_lm(student, _batches(), cfg, teacher=teacher if kd_weight else None, seed=seed)
    return student, stats


def test_uptraining_lowers_the_loss_and_is_deterministic():
    student, stats = _run(0.0)
    again, stats_again = _run(0.0)
    assert stats["final_loss"] < stats["first_loss"]
    assert stats["tokens"] == 15 * 4 * 12
    assert stats["final_loss"] == stats_again["final_loss"]
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), again.parameters(), strict=True))
    layers = decoder_layers(student)  # tying survives training
    assert layers[0].mlp.up_proj.base_layer.weight is layers[2].mlp.up_proj.base_layer.weight


def test_stats_record_the_precision_used():
    """bf16 autocast exists on CUDA only: on a CPU the run trains in fp32 and says so."""
    model = tiny_causal_lm("llama", vocab_size=32)
    cfg = UptrainConfig(steps=1, batch_size=4, seq_len=12, precision="bf16")
    stats = train_causal_lm(model, _batches(), cfg)
    assert stats["precision"] == ("bf16" if next(model.parameters()).is_cuda else "fp32")


def test_distillation_runs_and_needs_a_teacher():
    _, stats = _run(0.5, steps=5)
    assert stats["final_loss"] > 0
    with pytest.raises(DistillConfigError, match="teacher"):
        train_causal_lm(
            tiny_causal_lm("llama", vocab_size=32), _batches(), UptrainConfig(steps=1, kd_weight=0.5)
        )


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": -1}, "steps"),
        ({"kd_loss": "ce"}, "kd_loss"),
        ({"kd_weight": 2.0}, "kd_weight"),
        ({"learning_rate": 1}, "unknown"),
    ],
)
def test_bad_uptrain_settings_raise(data, message):
    with pytest.raises(DistillConfigError, match=message):
        UptrainConfig.from_dict(data)


def _student():
    torch.manual_seed(0)
    teacher = tiny_causal_lm(
        "llama",
        vocab_size=32,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
    )
    return convert_to_recursive(teacher, num_loops=2, init="average", lora_rank=2)


def _resumable(directory, batches=None, digest="d"):
    from lamda_repro.recursive.uptrain import Checkpointing

    cfg = UptrainConfig(steps=15, batch_size=4, seq_len=12, lr=1e-2, warmup_steps=2, checkpoint_every=5)
    student = _student()
    stats = train_causal_lm(
        student, batches or _batches(), cfg, checkpointing=Checkpointing(directory, digest)
    )
    return student, stats


def test_uptraining_resumes_from_the_last_complete_checkpoint(tmp_path, monkeypatch):
    import lamda_repro.recursive.uptrain as uptrain
    from lamda_repro.resume import read_marker

    reference, ref_stats = _resumable(tmp_path / "ref")
    assert ref_stats["resumed"] == 0 and read_marker(tmp_path / "ref" / "id-d" / "checkpoint-10") is not None

    save = uptrain._save_checkpoint

    def save_then_die(ck, state, *args):
        save(ck, state, *args)
        if state["step"] == 10:
            raise RuntimeError("process died after the checkpoint at step 10")

    monkeypatch.setattr(uptrain, "_save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="died"):
        _resumable(tmp_path / "run")
    monkeypatch.setattr(uptrain, "_save_checkpoint", save)
    (tmp_path / "run" / "id-d" / "checkpoint-12").mkdir()  # a checkpoint cut short: no marker, skipped
    resumed, stats = _resumable(tmp_path / "run")
    assert (stats["resumed"], stats["resumed_from_step"], stats["tokens"]) == (1, 10, ref_stats["tokens"])
    assert stats["final_loss"] == ref_stats["final_loss"]
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), reference.parameters(), strict=True))
    # a checkpoint of another spec (same folder) is never resumed, nor removed
    _, other = _resumable(tmp_path / "run", digest="other")
    assert other["resumed"] == 0 and read_marker(tmp_path / "run" / "id-d" / "checkpoint-10") is not None


def test_damaged_uptraining_checkpoints_fall_back_to_the_previous_one_then_a_fresh_start(tmp_path, caplog):
    import json
    import logging

    from lamda_repro.resume import MARKER, write_marker

    reference, ref_stats = _resumable(tmp_path / "ref")
    folder = tmp_path / "ref" / "id-d"
    weights = folder / "checkpoint-10" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-32:] = bytes(b ^ 0xFF for b in data[-32:])  # same size, other bytes: skipped
    weights.write_bytes(bytes(data))
    # the previous one's marker matches its files, but they do not load: set aside, fresh start
    ckpt = folder / "checkpoint-5"
    marker = json.loads((ckpt / MARKER).read_text())
    (ckpt / "optim.pt").write_bytes(b"not a torch file")
    write_marker(ckpt, {k: v for k, v in marker.items() if k != "files"})
    with caplog.at_level(logging.INFO, logger="lamda_repro"):
        resumed, stats = _resumable(tmp_path / "ref")
    assert "trainable.safetensors: not the bytes its marker lists" in caplog.text
    assert f"loading checkpoint {ckpt} failed" in caplog.text
    assert (stats["resumed"], stats["resumed_from_step"]) == (0, None)
    assert stats["final_loss"] == ref_stats["final_loss"]
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), reference.parameters(), strict=True))


def test_sigterm_during_uptraining_checkpoints_and_raises(tmp_path):
    import os
    import signal

    from lamda_repro.recursive.uptrain import Checkpointing
    from lamda_repro.resume import Preempted, SigtermFlag, read_marker

    def batches():
        for i, batch in enumerate(_batches()):
            if i == 5:  # during step 6
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    cfg = UptrainConfig(
        steps=15, batch_size=4, seq_len=12, lr=1e-2, warmup_steps=2
    )  # no periodic checkpoints
    with SigtermFlag() as flag, pytest.raises(Preempted, match="checkpoint at step 6"):
        flag.training = True
        train_causal_lm(_student(), batches(), cfg, checkpointing=Checkpointing(tmp_path, "d", flag))
    assert read_marker(tmp_path / "id-d" / "checkpoint-6")["step"] == 6
