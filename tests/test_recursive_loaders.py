"""Every model loader of the suite detects a save_recursive checkpoint: rebuilds it or refuses it."""

from __future__ import annotations

import pytest
import torch

from lamda_repro.models import ModelSourceError, build_word_tokenizer, is_recursive_checkpoint, load_model
from lamda_repro.recursive.bench import benchmark_conversion
from lamda_repro.recursive.cli import main as recursive_main
from lamda_repro.recursive.convert import (
    RecursiveConfigError,
    convert_to_recursive,
    load_causal_lm,
    save_recursive,
)
from lamda_repro.recursive.runner import load_base
from lamda_repro.recursive.tiny import tiny_causal_lm


def _ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(plain folder, recursive folder with relaxation LoRAs, the recursive model's logits)."""
    root = tmp_path_factory.mktemp("recursive_loaders")
    torch.manual_seed(0)
    model = tiny_causal_lm(
        "llama", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
        intermediate_size=48,
    ).eval()  # fmt: skip
    model.save_pretrained(root / "plain")
    recursive = convert_to_recursive(model, num_loops=2, init="average", lora_rank=4).eval()
    with torch.no_grad():  # non-zero LoRAs, so dropping them would show
        for name, param in recursive.named_parameters():
            if "lora" in name.lower():
                param.normal_(0, 0.05)
        expected = recursive(_ids()).logits
    tokenizer = build_word_tokenizer(["a small corpus for the loader test"], 64, "llama")
    save_recursive(recursive, root / "recursive", tokenizer)
    return root / "plain", root / "recursive", expected


def test_detection(checkpoints, tmp_path):
    plain, recursive, _ = checkpoints
    assert is_recursive_checkpoint(recursive) and not is_recursive_checkpoint(plain)
    assert not is_recursive_checkpoint(tmp_path) and not is_recursive_checkpoint("org/hub-id")


def test_plain_from_pretrained_would_load_it_wrongly(checkpoints):
    from transformers import AutoModelForCausalLM

    _, recursive, expected = checkpoints
    wrong = AutoModelForCausalLM.from_pretrained(recursive).eval()  # no error: that is the hazard
    with torch.no_grad():
        assert not torch.allclose(wrong(_ids()).logits, expected, atol=1e-3)


def test_recursive_stage_loaders_rebuild_it(checkpoints):
    _, recursive, expected = checkpoints
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(recursive).eval()(_ids()).logits, expected)
        section = {"models": {"rt": {"path": str(recursive)}}}
        model, _ = load_base(section, "rt", recursive.parent, torch.device("cpu"))
        torch.testing.assert_close(model(_ids()).logits, expected)
    # Loaded as what it is, it cannot be converted again (before, it was benchmarked as a plain model).
    with pytest.raises(RecursiveConfigError, match="already recursive"):
        benchmark_conversion(str(recursive), num_loops=2, batch_size=1, seq_len=4, repeats=1)


def test_fine_tuning_loader_refuses_it_in_one_line(checkpoints):
    _, recursive, _ = checkpoints
    entry = {"source": "local", "path": str(recursive)}
    with pytest.raises(ModelSourceError, match="is a recursive checkpoint") as info:
        load_model(entry, "rt", "unused", "causal-lm")
    assert "\n" not in str(info.value) and "models.rt.path" in str(info.value)


def test_relax_error_refuses_it(checkpoints, capsys):
    _, recursive, _ = checkpoints
    args = ["recursive-relax-error", "--model-path", str(recursive), "--budget-lora-ranks", "4"]
    code = recursive_main(args)
    assert code == 2
    assert "is a recursive checkpoint" in capsys.readouterr().err
