"""LaMDA++ rank allocation: deterministic, within budget and clamps, more rank where the spectrum says."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_lamda_helpers import tiny_llama  # noqa: F401

from lamda_repro.methods.lamda import allocate_ranks, rank_pattern_for_lamdapp, weight_spectra
from lamda_repro.methods.lamda.allocation import RankAllocationError, captured_energy


def matrix_with_spectrum(sigma, n=64, seed=0):
    """A matrix with exactly the given singular values (random orthogonal factors)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.zeros(n, dtype=torch.float64)
    s[: len(sigma)] = torch.as_tensor(sigma, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T


def test_captured_energy_matches_definition():
    assert captured_energy([3.0, 4.0], 1) == pytest.approx(16 / 25)
    assert captured_energy([1.0, 1.0, 1.0, 1.0], 2) == pytest.approx(0.5)
    assert captured_energy([0.0, 0.0], 1) == 1.0


def test_flat_spectrum_gets_more_rank_than_concentrated_one():
    flat = [1.0] * 64
    steep = [2.0**-i for i in range(64)]
    ranks = allocate_ranks({"flat": flat, "steep": steep, "mid": [0.9**i for i in range(64)]}, r0=8)
    assert ranks["flat"] > ranks["mid"] > ranks["steep"]
    reverse = allocate_ranks({"flat": flat, "steep": steep}, r0=8, direction="more_energy_more_rank")
    assert reverse["steep"] > reverse["flat"]


def test_budget_and_clamps_are_respected():
    spectra = {f"m{i}": [1.0 / (1 + i * j) for j in range(64)] for i in range(10)}
    r0 = 8
    for kw in ({}, {"r_min": 4, "r_max": 12}, {"r_min": 2, "r_max": 64}):
        ranks = allocate_ranks(spectra, r0, **kw)
        assert sum(r * r for r in ranks.values()) <= len(spectra) * r0 * r0
        assert all(kw.get("r_min", 1) <= r <= kw.get("r_max", 4 * r0) for r in ranks.values())
        # nearly all of the budget is used (at most one increment per module left over)
        assert sum(r * r for r in ranks.values()) >= len(spectra) * r0 * r0 - sum(
            2 * r + 1 for r in ranks.values()
        )
    linear = allocate_ranks(spectra, r0, budget="linear")
    assert sum(linear.values()) <= len(spectra) * r0


def test_equal_spectra_give_uniform_ranks_and_allocation_is_deterministic():
    spectra = {f"layer{i}": [1.0 / (j + 1) for j in range(32)] for i in range(6)}
    assert allocate_ranks(spectra, 8) == {n: 8 for n in spectra}
    mixed = {"a": [1.0] * 32, "b": [1 / (j + 1) for j in range(32)], "c": [0.5**j for j in range(32)]}
    assert allocate_ranks(mixed, 6) == allocate_ranks(dict(reversed(list(mixed.items()))), 6)


def test_rank_capped_by_matrix_size():
    ranks = allocate_ranks({"small": [1.0] * 4, "big": [0.5**j for j in range(64)]}, r0=8, r_max=32)
    assert ranks["small"] <= 4


def test_invalid_inputs_raise():
    with pytest.raises(RankAllocationError, match="r0"):
        allocate_ranks({"a": [1.0]}, 0)
    with pytest.raises(RankAllocationError, match="direction"):
        allocate_ranks({"a": [1.0]}, 1, direction="up")
    with pytest.raises(RankAllocationError, match="budget"):
        allocate_ranks({"a": [1.0] * 8, "b": [1.0] * 8}, 2, r_min=3)
    with pytest.raises(RankAllocationError, match="non-negative"):
        allocate_ranks({"a": [-1.0]}, 1)


def test_known_spectra_in_a_model_and_lora_rank_pattern_export():
    model = tiny_llama(hidden=64, layers=1)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.copy_(matrix_with_spectrum([1.0] * 64).float())
        model.model.layers[0].self_attn.v_proj.weight[:32].copy_(
            matrix_with_spectrum([0.5**j for j in range(32)], seed=1)[:32].float()
        )
        model.model.layers[0].self_attn.v_proj.weight[32:].zero_()
    spectra = weight_spectra(model, ["q_proj", "v_proj"])
    assert set(spectra) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    pattern = rank_pattern_for_lamdapp(model, ["q_proj", "v_proj"], r0=4)
    q_rank = pattern[r"model\.layers\.0\.self_attn\.q_proj"]
    v_rank = pattern[r"model\.layers\.0\.self_attn\.v_proj"]
    assert q_rank > v_rank
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern=pattern))
    layer = lora.base_model.model.model.layers[0].self_attn
    assert layer.q_proj.lora_A["default"].weight.shape[0] == q_rank
    assert layer.v_proj.lora_A["default"].weight.shape[0] == v_rank


def test_truncated_spectrum_gives_the_same_energy_and_allocation():
    from lamda_repro.methods.lamda.allocation import TruncatedSpectrum

    model = tiny_llama(hidden=64, layers=1)
    exact = weight_spectra(model, ["q_proj", "up_proj"])
    top = weight_spectra(model, ["q_proj", "up_proj"], top_k=8, niter=8)
    for name, spectrum in top.items():
        assert isinstance(spectrum, TruncatedSpectrum) and len(spectrum.values) == 8
        assert spectrum.max_rank == len(exact[name])
        assert captured_energy(spectrum, 4) == pytest.approx(captured_energy(exact[name], 4), rel=0.05)
    assert allocate_ranks(top, 4) == allocate_ranks(exact, 4)
    with pytest.raises(RankAllocationError, match="truncated"):
        captured_energy(TruncatedSpectrum((1.0, 0.5), 2.0, 10), 3)
