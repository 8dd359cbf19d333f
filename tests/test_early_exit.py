"""Early exit: per-loop logits, the training loss, exit rules and distributions, post-training."""

import math

import pytest
import torch

from lamda_repro.recursive import corpus
from lamda_repro.recursive.convert import convert_to_recursive
from lamda_repro.recursive.early_exit import (
    EarlyExitConfig,
    EarlyExitConfigError,
    confidence_exit,
    early_exit_loss,
    exit_distribution,
    exit_loops,
    loop_logits,
    loop_weights,
    mean_loops,
    oracle_exit,
    train_early_exit,
)
from lamda_repro.recursive.tiny import tiny_causal_lm


def _recursive(loops=2, layers=4, seed=0):
    torch.manual_seed(seed)
    return convert_to_recursive(tiny_causal_lm("llama", num_layers=layers, hidden_size=32), loops).eval()


def test_last_loop_logits_are_the_model_logits():
    model = _recursive(loops=3, layers=6)
    ids = torch.randint(0, 128, (2, 7))
    per_loop = loop_logits(model, ids)
    assert len(per_loop) == 3
    torch.testing.assert_close(per_loop[-1], model(ids).logits)
    assert not torch.allclose(per_loop[0], per_loop[-1])


def test_loop_weights_are_aggressive_by_default():
    assert loop_weights(3) == [0.1, 0.1, 1.0]
    assert loop_weights(2, 0.5, 2.0) == [0.5, 2.0]


def test_loss_of_uniform_logits_is_weighted_log_vocabulary():
    ids = torch.tensor([[1, 2, 3]])
    uniform = [torch.zeros(1, 3, 5), torch.zeros(1, 3, 5)]
    loss, parts = early_exit_loss(uniform, ids, [0.1, 1.0], kd_weight=1.0)
    assert loss.item() == pytest.approx(1.1 * math.log(5))  # KD of identical distributions is 0
    assert parts["kd_loop0"] == pytest.approx(0.0, abs=1e-7)


def test_distillation_targets_the_detached_final_loop():
    ids = torch.tensor([[1, 2, 3]])
    final = torch.randn(1, 3, 4, requires_grad=True)
    grads = []
    for kd_weight in (0.0, 1.0):
        first = torch.zeros(1, 3, 4, requires_grad=True)
        loss, _ = early_exit_loss([first, final], ids, [1.0, 0.0], kd_weight=kd_weight)
        loss.backward()
        grads.append(first.grad)
    assert not torch.allclose(grads[0], grads[1])  # KD moves the intermediate loop...
    assert final.grad.abs().sum() == 0  # ...towards a target that receives no gradient from it


def test_confidence_and_oracle_exit_rules_on_hand_made_logits():
    # three tokens, two loops; probabilities after loop 1: 0.9 / 0.5 / 0.6 on tokens 0 / 1 / 2
    loop1 = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]))
    loop2 = torch.log(torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]]))
    logits = torch.stack([loop1, loop2])
    assert confidence_exit(logits, 0.8).tolist() == [0, 1, 1]
    assert confidence_exit(logits, 0.5).tolist() == [0, 0, 0]
    assert confidence_exit(logits, 1.0).tolist() == [1, 1, 1]
    assert oracle_exit(logits).tolist() == [0, 1, 0]  # token 1's first argmax disagrees with the final
    assert exit_loops(logits, "oracle").tolist() == [0, 1, 0]


def test_exit_distribution_and_mean_loops():
    dist = exit_distribution([0, 0, 1, 0], 2)
    assert dist == [0.75, 0.25] and mean_loops(dist) == pytest.approx(1.25)
    assert exit_distribution(torch.tensor([2, 2]), 3) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5, "high", True])
def test_thresholds_outside_zero_one_are_refused(threshold):
    with pytest.raises(EarlyExitConfigError, match=r"threshold must lie in \(0, 1\]") as info:
        EarlyExitConfig(thresholds=[0.5, threshold])
    assert "early_exit.thresholds[1]" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(EarlyExitConfigError):
        exit_loops(torch.zeros(2, 1, 3), "confidence", threshold)


def test_bad_early_exit_settings_name_the_key():
    with pytest.raises(EarlyExitConfigError, match="early_exit.kv_policy"):
        EarlyExitConfig(kv_policy="drop")
    with pytest.raises(EarlyExitConfigError, match="unknown early_exit keys"):
        EarlyExitConfig.from_dict({"stepz": 3})
    with pytest.raises(EarlyExitConfigError, match="both 0"):
        EarlyExitConfig(intermediate_weight=0, final_weight=0)


def test_post_training_lowers_the_first_loops_loss():
    tokenizer = corpus.build_word_tokenizer(corpus.smoke_vocabulary())
    torch.manual_seed(0)
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=4)
    model = convert_to_recursive(base, 2)
    docs = corpus.smoke_documents(60, seed=0)
    batches = corpus.batches(iter(docs), tokenizer, 32, 8, repeat=True, text_factory=lambda: iter(docs))
    cfg = EarlyExitConfig(
        steps=25, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2, intermediate_weight=1.0
    )
    stats = train_early_exit(model, batches, cfg, seed=0)
    assert stats["final_parts"]["lm_loop0"] < stats["first_parts"]["lm_loop0"]
    assert stats["loop_weights"] == [1.0, 1.0] and not model.training


def test_local_tasks_are_found_without_indexing_lm_evals_own_library(tmp_path):
    from lamda_repro.recursive.evaluate import EvalConfigError, task_manager

    tasks = corpus.write_smoke_tasks(tmp_path / "tasks", seed=0, test_size=2, train_size=2)
    manager = task_manager(tasks, str(tmp_path / "tasks"))
    assert sorted(manager.all_tasks) == sorted(tasks)  # only the local tasks were indexed
    with pytest.raises(EvalConfigError, match="unknown lm-eval tasks"):
        task_manager(["smoke_facts", "no_such_task_anywhere"], str(tmp_path / "tasks"))
