"""Freeze schedule of B (spec acceptance 2, 3) in a plain loop and through transformers.Trainer."""

from __future__ import annotations

import torch
from peft import get_peft_model
from test_lamda_helpers import (
    LLAMA_TARGETS,
    minilm_batch,
    minilm_cls,
    tiny_llama,  # noqa: F401
    token_batch,
)

from lamda_repro.methods.lamda import (
    LamdaConfig,
    LamdaFreezeCallback,
    LamdaFreezeController,
    LamdaLayer,
    frozen_count_at_step,
    reference_code_zeroed_columns,
)


def test_schedule_freezes_component_k_at_floor_k_f_t_over_r():
    r, f, T = 8, 0.3, 100
    for k in range(r):
        due = (k * 3 * T) // (10 * r)  # floor(k * 0.3 * T / r) in integers
        assert frozen_count_at_step(due, r, f, T) >= k + 1
        if due > 0:
            assert frozen_count_at_step(due - 1, r, f, T) <= k
    assert [frozen_count_at_step(s, 4, 0.3, 10) for s in range(4)] == [2, 3, 4, 4]
    assert frozen_count_at_step(29, r, f, T) == r  # all frozen within the first 30% of steps
    assert frozen_count_at_step(0, r, 0.0, T) == r  # freeze_fraction 0: only S ever trains


def test_reference_code_rule_zeroes_at_most_three_columns():
    assert [reference_code_zeroed_columns(s, 64, 100) for s in (0, 29, 30, 59, 60, 90, 99, 100)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        3,
        3,
    ]


def _lamda(total=8, r=4, fraction=0.5, init="svd"):
    return get_peft_model(
        tiny_llama(),
        LamdaConfig(
            r=r,
            lora_alpha=8,
            target_modules=LLAMA_TARGETS,
            init=init,
            freeze_fraction=fraction,
            total_steps=total,
        ),
    )


def _loop(model, optimizer, controller, steps, start=0, snapshots=None):
    x = token_batch()
    model.train()
    for step in range(start, start + steps):
        model(x, labels=x).loss.backward()
        controller.before_optimizer_step(optimizer, step)
        optimizer.step()
        optimizer.zero_grad()
        if snapshots is not None:
            snapshots.append(
                {
                    n: m.full_B("default").detach().clone()
                    for n, m in model.named_modules()
                    if isinstance(m, LamdaLayer)
                }
            )


def test_frozen_components_are_bit_identical_under_adamw_weight_decay():
    model = _lamda(total=12, fraction=0.5)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.5
    )
    controller = LamdaFreezeController(model, 12)
    snapshots = []
    _loop(model, optimizer, controller, 12, snapshots=snapshots)
    name = next(iter(snapshots[0]))
    for step in range(12):
        k = frozen_count_at_step(step, 4, 0.5, 12)
        # columns frozen before step `step` never change from then on
        for later in snapshots[step:]:
            assert torch.equal(later[name][:, :k], snapshots[step][name][:, :k])
    # a column that was trainable for a while did move (the test can see movement)
    assert not torch.equal(snapshots[-1][name][:, 3], snapshots[0][name][:, 3])


def test_full_freeze_on_one_process_removes_b_from_optimizer_and_frees_its_state():
    model = _lamda(total=4, fraction=0.5)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    controller = LamdaFreezeController(model, 4)
    _loop(model, optimizer, controller, 2)
    controller.freeze_for_step(optimizer, 2)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for module in model.modules():
        if isinstance(module, LamdaLayer):
            B = module.lamda_B["default"]
            assert module.frozen_components("default") == 4
            assert not B.requires_grad and id(B) not in in_optimizer and B not in optimizer.state
            assert id(module.lamda_S["default"]) in in_optimizer
    assert len(optimizer.state) == len(in_optimizer)


def test_full_freeze_of_a_data_parallel_replica_keeps_b_with_zero_state_and_gradient(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a wrapper registered B: it must stay the same Parameter
    model = _lamda(total=4, fraction=0.5)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    controller = LamdaFreezeController(model, 4)
    b_objects = {id(m.lamda_B["default"]) for m in model.modules() if isinstance(m, LamdaLayer)}
    _loop(model, optimizer, controller, 2)
    controller.freeze_for_step(optimizer, 2)
    x = token_batch()
    model(x, labels=x).loss.backward()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for module in model.modules():
        if isinstance(module, LamdaLayer):
            B = module.lamda_B["default"]
            assert module.frozen_components("default") == 4 and id(B) in b_objects and id(B) in in_optimizer
            assert all(torch.count_nonzero(v) == 0 for v in optimizer.state[B].values() if v.dim() == 2)
            assert B.grad is not None and torch.count_nonzero(B.grad) == 0  # in the graph, no gradient
            assert module.frozen_trainable_elements() == B.numel()
            assert torch.count_nonzero(module.lamda_S["default"].grad) > 0


def test_partial_freeze_keeps_optimizer_state_of_remaining_columns():
    model = _lamda(total=8, fraction=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = LamdaFreezeController(model, 8)
    _loop(model, optimizer, controller, 2)  # S = 0 at step 0: B's first gradient is 0
    layer = next(m for m in model.modules() if isinstance(m, LamdaLayer))
    before = optimizer.state[layer.lamda_B["default"]]["exp_avg"].clone()
    k0 = layer.frozen_components("default")
    controller.freeze_for_step(optimizer, 2)
    k1 = layer.frozen_components("default")
    assert k1 > k0
    after = optimizer.state[layer.lamda_B["default"]]["exp_avg"]
    assert torch.equal(after[:, k1:], before[:, k1:]) and torch.count_nonzero(before[:, k0:k1]) > 0
    assert torch.count_nonzero(after[:, :k1]) == 0


def test_reference_code_rule_lets_zeroed_columns_move():
    model = _lamda(total=10, fraction=0.3, init="reference_code")
    layer = next(m for m in model.modules() if isinstance(m, LamdaLayer))
    with torch.no_grad():
        layer.lamda_B["default"].normal_()  # B = 0 would hide weight decay
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5
    )
    controller = LamdaFreezeController(model, 10)
    _loop(model, optimizer, controller, 3)
    before = layer.lamda_B["default"].detach().clone()
    _loop(model, optimizer, controller, 3, start=3)  # steps 3-5: column 0 gradient zeroed
    assert layer.frozen_components("default") == 0
    assert not torch.equal(layer.lamda_B["default"][:, 0], before[:, 0])


def test_trainer_callback_freezes_b_and_counts_updates(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lamda_repro.methods.lamda.method import updated_elements_in_optimizer

    batch = minilm_batch()
    data = Dataset.from_dict(
        {
            "input_ids": batch["input_ids"].tolist() * 4,
            "attention_mask": batch["attention_mask"].tolist() * 4,
            "labels": [0, 1] * 4,
        }
    )
    model = get_peft_model(
        minilm_cls(),
        LamdaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", freeze_fraction=0.5),
    )
    updates = []

    class Count(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            updates.append(updated_elements_in_optimizer(getattr(optimizer, "optimizer", optimizer), model))

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LamdaFreezeCallback(), Count()])
    trainer.train()
    layers = [m for m in model.modules() if isinstance(m, LamdaLayer)]
    assert all(m.frozen_components("default") == 4 for m in layers)
    s_elems = 16 * len(layers)
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)
    assert updates[-1] == s_elems + head
    assert updates[0] > updates[-1]
    assert updates == sorted(updates, reverse=True)
