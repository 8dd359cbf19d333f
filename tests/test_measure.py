"""Measurements against values computed by hand."""

from __future__ import annotations

import torch
from torch import nn

from lamda_repro import measure


def test_count_parameters_counts_shared_tensors_once():
    a = nn.Linear(4, 3)
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)
    assert measure.count_parameters(model) == {"trainable": 4 * 3 + 3 + 3 * 2, "total": 4 * 3 + 3 + 3 * 2 + 2}
    tied = nn.ModuleList([a, a])
    assert measure.count_parameters(tied)["total"] == 4 * 3 + 3


def test_saved_for_backward_counts_activations_not_weights():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(5, 16)
    # y = x W^T: autograd saves x (for dW); W is a parameter and is excluded.
    n = measure.saved_for_backward_bytes(lambda: lin(x).sum(), lin)
    assert n == 5 * 16 * 4
    assert lin.weight.grad is not None  # backward ran
    lin.weight.requires_grad_(False)
    x2 = torch.randn(5, 16, requires_grad=True)
    # Frozen weight, trainable input: only W is needed (excluded), nothing else is saved.
    assert measure.saved_for_backward_bytes(lambda: lin(x2).sum(), lin) == 0


def test_saved_views_count_their_storage_once():
    x = torch.randn(4, 8, requires_grad=True)

    def fn():
        h = x * 2.0  # saves nothing for a scalar multiply
        return (h[:, :4] * h[:, 4:]).sum()  # saves two views of h's storage

    assert measure.saved_for_backward_bytes(fn) == 4 * 8 * 4


def test_memory_breakdown_and_optimizer_state():
    lin = nn.Linear(10, 10)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(2, 10)).sum().backward()
    opt.step()
    b = measure.memory_breakdown(lin, opt)
    assert b["param_bytes"] == 110 * 4
    assert b["grad_bytes"] == 110 * 4
    # AdamW: exp_avg + exp_avg_sq per element, plus a scalar step per parameter tensor.
    assert b["optimizer_state_bytes"] == 2 * 110 * 4 + 2 * 4
    assert measure.optimizer_state_elements(opt, lin.parameters()) == 2 * 110


def test_default_updated_elements_skips_params_without_grad():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    opt = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1)
    a(torch.randn(1, 3)).sum().backward()
    assert measure.default_updated_elements(opt) == 12


def test_update_counter_uses_method_count_when_given():
    lin = nn.Linear(3, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    lin(torch.randn(1, 3)).sum().backward()
    c = measure.UpdateCounter()
    c.on_optimizer_step(None, None, None, model=lin, optimizer=opt)
    c.on_optimizer_step(None, None, None, model=lin, optimizer=opt)
    assert (c.total, c.steps) == (24, 2)
    c2 = measure.UpdateCounter(lambda model, optimizer: 5)
    c2.on_optimizer_step(None, None, None, model=lin, optimizer=opt)
    assert c2.total == 5


def test_peak_memory_on_cpu_sees_a_large_allocation():
    with measure.PeakMemory("cpu") as pm:
        big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        big += 1
    r = pm.result()
    del big
    assert r["peak_kind"] == "cpu_rss"
    assert r["peak_delta_bytes"] >= 48 * 1024 * 1024


def test_saved_bytes_count_only_what_the_step_keeps():
    """A tensor saved by a part of the graph that the forward pass drops is freed before the
    step ends (and its address may be reused): it does not count, whatever the allocator does."""
    from lamda_repro.measure import saved_for_backward_bytes

    x = torch.randn(1000, requires_grad=True)
    y = torch.randn(2000, requires_grad=True)

    def fn():
        dropped = (x * 2).cos()  # cos saves its input (x * 2); the graph goes with `dropped`
        del dropped
        return (y * 3).sin().sum()  # sin saves its input: 2000 floats

    assert saved_for_backward_bytes(fn) == 8000
