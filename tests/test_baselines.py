"""The peft baselines (LoRA, LoRA-FA, PiSSA, DoRA, AdaLoRA, VeRA) through one table of cases."""

from __future__ import annotations

import pytest
import torch

from lamda_repro.config import ConfigError
from lamda_repro.measure import count_parameters
from lamda_repro.methods.base import MethodConfigError, MethodContext, build_method, get_method_class
from lamda_repro.methods.peft_methods import adalora_ranks

TARGETS = ["query", "key", "value", "dense"]
STEPS = 4

# method entry as in the config, per baseline
METHODS = {
    "lora": {"type": "lora", "r": 4, "alpha": 8, "target_modules": TARGETS},
    "lora_fa": {"type": "lora_fa", "r": 4, "alpha": 8, "target_modules": TARGETS},
    "pissa": {"type": "pissa", "r": 4, "alpha": 4, "target_modules": TARGETS},
    "dora": {"type": "dora", "r": 4, "alpha": 8, "target_modules": TARGETS},
    "adalora": {"type": "adalora", "r": 2, "init_r": 4, "tinit": 1, "tfinal": 1, "target_modules": TARGETS},
    "vera": {"type": "vera", "r": 16, "target_modules": TARGETS},
}


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def toy_batches(n: int = 16, length: int = 12, seed: int = 1):
    """Label = whether token 5 occurs in the sequence: learnable, deterministic."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(6, 64, (length,), generator=g)
        label = int(torch.rand((), generator=g) < 0.5)
        if label:
            ids[torch.randint(1, length, (), generator=g)] = 5
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(length, dtype=torch.long),
                "labels": torch.tensor(label),
            }
        )
    return rows


def train(model, method, ctx, rows, tmp_path, steps=STEPS):
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,
    )
    optimizer = method.create_optimizer(model, args.learning_rate, 0.0, ctx)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        callbacks=method.callbacks(model, ctx),
        optimizers=(optimizer, None) if optimizer is not None else (None, None),
    )
    trainer.train()
    model.eval()
    return trainer


def logits(model, rows):
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(**batch).logits


def snapshot(model, fragment):
    return {n: p.detach().clone() for n, p in model.named_parameters() if fragment in n}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_baseline_config_is_valid_and_bad_keys_fail_in_one_line(name):
    entry = METHODS[name]
    cls = get_method_class(entry["type"])
    cls.check_params(entry, f"methods.{name}")
    with pytest.raises(ConfigError) as err:
        cls.check_params({**entry, "rank": 4}, f"methods.{name}")
    assert "\n" not in str(err.value) and f"methods.{name}" in str(err.value)
    with pytest.raises(ConfigError):
        cls.check_params({**entry, "r": 0}, f"methods.{name}")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_baseline_trains_saves_and_reloads(name, tmp_path):
    from peft import PeftModel

    rows = toy_batches()
    ctx = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=STEPS)
    method = build_method(METHODS[name])
    model = method.apply(tiny_bert(), ctx)

    # The suite's count equals peft's own count, and the classifier head trains.
    ours = count_parameters(model)
    trainable, total = model.get_nb_trainable_parameters()
    assert ours["trainable"] == trainable and ours["total"] == total
    head = [n for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert head, "classifier head must be trainable for seq-cls"
    base_frozen = [n for n, p in model.named_parameters() if "base_layer" in n and p.requires_grad]
    assert not base_frozen

    adapter_key = {"vera": "vera_lambda_b", "adalora": "lora_E"}.get(name, "lora_B")
    before = snapshot(model, adapter_key)
    base_before = snapshot(model, "base_layer")
    train(model, method, ctx, rows, tmp_path)
    after = snapshot(model, adapter_key)
    assert any(not torch.equal(before[k], after[k]) for k in before), "adapter did not train"
    base_after = snapshot(model, "base_layer")
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)

    expected = logits(model, rows)
    if name == "pissa":
        # PiSSA replaced the base weights by residuals: save a LoRA that applies to the original.
        method.save_as_lora(model, str(tmp_path / "adapter"))
    else:
        model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(reloaded, rows), expected, atol=1e-4, rtol=1e-4)


def test_lora_fa_keeps_a_frozen_and_counts_only_b():
    ctx = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=STEPS)
    lora = build_method(METHODS["lora"]).apply(tiny_bert(), ctx)
    fa = build_method(METHODS["lora_fa"]).apply(tiny_bert(), ctx)
    a_elements = sum(p.numel() for n, p in lora.named_parameters() if "lora_A" in n)
    assert count_parameters(fa)["trainable"] == count_parameters(lora)["trainable"] - a_elements


def test_lora_fa_training_leaves_a_unchanged(tmp_path):
    ctx = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=STEPS)
    method = build_method(METHODS["lora_fa"])
    model = method.apply(tiny_bert(), ctx)
    a_before = snapshot(model, "lora_A")
    train(model, method, ctx, toy_batches(), tmp_path)
    a_after = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert all(torch.equal(a_before[k], a_after[k]) for k in a_before)


def test_pissa_starts_from_the_same_function_with_changed_base_weights():
    ctx = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=STEPS)
    rows = toy_batches(n=4)
    plain = tiny_bert()
    reference = logits(plain, rows)
    model = build_method(METHODS["pissa"]).apply(tiny_bert(), ctx)
    model.eval()
    # The classifier head is outside PiSSA: compare hidden features through the same head.
    torch.testing.assert_close(logits(model, rows), reference, atol=1e-4, rtol=1e-4)
    original = plain.bert.encoder.layer[0].attention.self.query.weight
    residual = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert not torch.allclose(original, residual)


def test_adalora_prunes_ranks_to_the_budget(tmp_path):
    entry = {"type": "adalora", "r": 2, "init_r": 4, "tinit": 1, "tfinal": 3, "target_modules": TARGETS}
    ctx = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=12)
    method = build_method(entry)
    model = method.apply(tiny_bert(), ctx)
    start = adalora_ranks(model)
    assert set(start.values()) == {4}
    train(model, method, ctx, toy_batches(), tmp_path, steps=12)
    ranks = method.record_info(model)["rank_allocation"]
    assert sum(ranks.values()) <= 2 * len(ranks) < sum(start.values())


def test_adalora_refuses_a_schedule_without_a_budgeting_phase():
    ctx = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=4)
    method = build_method({"type": "adalora", "r": 2, "tinit": 2, "tfinal": 2, "target_modules": TARGETS})
    with pytest.raises(MethodConfigError, match="tinit"):
        method.apply(tiny_bert(), ctx)


def test_rank_pattern_sets_per_module_ranks():
    entry = {**METHODS["dora"], "rank_pattern": {"layer.0.attention.self.query": 2, "value": 6}}
    ctx = MethodContext(task_kind="seq-cls", model_type="bert", total_steps=STEPS)
    model = build_method(entry).apply(tiny_bert(), ctx)
    layer0 = model.base_model.model.bert.encoder.layer[0].attention.self
    assert layer0.query.lora_A["default"].weight.shape[0] == 2
    assert layer0.value.lora_A["default"].weight.shape[0] == 6
    assert layer0.key.lora_A["default"].weight.shape[0] == 4


@pytest.mark.parametrize("name", ["lora_fa", "dora", "vera"])
def test_baseline_on_a_causal_lm(name, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    entry = {**METHODS[name], "target_modules": ["c_attn", "c_proj"]}
    ctx = MethodContext(task_kind="causal-lm", model_type="gpt2", total_steps=4)
    method = build_method(entry)
    model = method.apply(model, ctx)
    assert count_parameters(model)["trainable"] == model.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]

    def loss():
        with torch.no_grad():
            return model.eval()(input_ids=ids, labels=ids).loss.item()

    first = loss()
    train(model, method, ctx, rows, tmp_path, steps=4)
    assert loss() < first


def test_deberta_head_trains_and_pooler_needs_modules_to_save():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    def deberta():
        torch.manual_seed(0)
        return DebertaV2ForSequenceClassification(
            DebertaV2Config(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=3,
            )
        )

    ctx = MethodContext(task_kind="seq-cls", model_type="deberta-v2", total_steps=STEPS)
    entry = {"type": "lora", "r": 4, "target_modules": ["query_proj", "value_proj"]}

    def trainable_outside_encoder(model):
        return {
            n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and ".encoder." not in n
        }

    assert trainable_outside_encoder(build_method(entry).apply(deberta(), ctx)) == {"classifier"}
    with_pooler = build_method({**entry, "modules_to_save": ["pooler"]}).apply(deberta(), ctx)
    assert trainable_outside_encoder(with_pooler) == {"classifier", "pooler"}
