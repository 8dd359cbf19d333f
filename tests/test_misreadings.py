"""Settings that used to be misread silently: warmup over the whole run, fp16 on a CPU, ranks
above a module's size, and the file mode of written outputs."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from lamda_repro.methods.base import MethodConfigError, MethodContext, build_method
from lamda_repro.methods.peft_methods import check_ranks_fit
from lamda_repro.results import write_json_atomic, write_text_atomic
from lamda_repro.train import _warmup_steps


@pytest.mark.parametrize("ratio,total,steps", [(0.0, 40, 0), (0.1, 40, 4), (0.5, 40, 20), (1.0, 40, 40)])
def test_warmup_ratio_is_a_share_of_the_run_up_to_the_whole_run(tmp_path, ratio, total, steps):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=_warmup_steps(ratio, total), use_cpu=True)
    assert args.get_warmup_steps(total) == steps


def test_fp16_on_a_run_that_resolves_to_cpu_fails_before_training(tmp_path):
    from lamda_repro.config import RunSpec
    from lamda_repro.train import run_finetune

    spec = RunSpec(
        experiment="e",
        family="nlu",
        task="t",
        task_params={
            "type": "glue",
            "subset": "sst2",
            "data_files": {"train": "absent", "validation": "absent"},
        },
        model="m",
        model_params={"source": "local", "path": str(tmp_path / "absent")},
        method="full",
        method_type="full",
        method_params={"type": "full"},
        seed=0,
        training={"precision": "fp16"},
    )
    rec = run_finetune(spec, tmp_path / "r.json", workdir=str(tmp_path), device="cpu")
    assert rec["status"] == "failed"
    assert rec["error"].startswith("ValueError: training.precision: fp16 needs a CUDA device")


def tiny():
    """A one-layer BERT: query 8 -> 8, intermediate.dense 8 -> 4."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    shape = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=4)
    return BertForSequenceClassification(BertConfig(**shape, vocab_size=20, num_labels=2))


CTX = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=100)


DOWN = ["intermediate.dense"]  # 8 -> 4
# (method entry, start of the one-line error)
RANK_CASES = [
    ({"type": "lora", "r": 5, "target_modules": DOWN}, "r: rank 5 exceeds min(d_in, d_out) = 4 of module"),
    ({"type": "dora", "r": 9, "target_modules": ["query"]}, "r: rank 9 exceeds min(d_in, d_out) = 8 of"),
    ({"type": "lora", "r": 2, "target_modules": ["query"], "rank_pattern": {"query": 9}}, "rank_pattern"),
    ({"type": "adalora", "r": 4, "target_modules": DOWN}, "init_r: rank 6 exceeds min(d_in, d_out) = 4"),
]
IDS = [f"{p['type']}{i}" for i, (p, _) in enumerate(RANK_CASES)]


@pytest.mark.parametrize("params,message", RANK_CASES, ids=IDS)
def test_rank_above_the_module_size_is_refused_in_one_line(params, message):
    method = build_method(params)
    with pytest.raises(MethodConfigError) as info:
        method.apply(tiny(), CTX)
    assert "\n" not in str(info.value) and str(info.value).startswith(message), str(info.value)


def test_ranks_that_fit_are_applied():
    model = build_method({"type": "lora", "r": 4, "target_modules": ["query", *DOWN]}).apply(tiny(), CTX)
    assert model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 2)
    from peft import LoraConfig

    check_ranks_fit(tiny(), LoraConfig(r=8, target_modules=["query"]))  # 8 = min(8, 8): allowed


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_are_written_with_the_process_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        write_text_atomic(tmp_path / "t.md", "x")
    finally:
        os.umask(old)
    for name in ("r.json", "t.md"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
