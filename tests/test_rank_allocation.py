"""LaMDA++ rank allocation: deterministic, within budget and clamps, more rank where the spectrum says."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_lamda_helpers import tiny_llama  # noqa: F401

from lamda_repro.methods.lamda import allocate_ranks, rank_pattern_for_lamdapp, weight_spectra
from lamda_repro.methods.lamda.allocation import (
    RULES,
    RankAllocationError,
    captured_energy,
    energy_curve,
    rank_histogram,
)


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
    spectra = {"flat": flat, "steep": steep, "mid": [0.9**i for i in range(64)]}
    for rule in RULES:
        ranks = allocate_ranks(spectra, r0=8, rule=rule)
        assert ranks["flat"] > ranks["mid"] > ranks["steep"], rule
    reverse = allocate_ranks(
        {"flat": flat, "steep": steep}, r0=8, rule="inverse_energy", direction="more_energy_more_rank"
    )
    assert reverse["steep"] > reverse["flat"]


def test_budget_and_clamps_are_respected():
    spectra = {f"m{i}": [1.0 / (1 + i * j) for j in range(64)] for i in range(10)}
    r0 = 8
    for kw in ({}, {"r_min": 4, "r_max": 12}, {"r_min": 2, "r_max": 64}, {"rule": "inverse_energy"}):
        ranks = allocate_ranks(spectra, r0, **kw)
        assert sum(r * r for r in ranks.values()) <= len(spectra) * r0 * r0
        assert all(kw.get("r_min", 1) <= r <= kw.get("r_max", 4 * r0) for r in ranks.values())
        # nearly all of the budget is used (at most one increment per module left over)
        assert sum(r * r for r in ranks.values()) >= len(spectra) * r0 * r0 - sum(
            2 * r + 1 for r in ranks.values()
        )
    for rule in RULES:
        linear = allocate_ranks(spectra, r0, budget="linear", rule=rule)
        assert sum(linear.values()) <= len(spectra) * r0
        assert sum(linear.values()) == len(spectra) * r0 or any(r == 4 * r0 for r in linear.values())


def test_equal_spectra_give_uniform_ranks_and_allocation_is_deterministic():
    spectra = {f"layer{i}": [1.0 / (j + 1) for j in range(32)] for i in range(6)}
    mixed = {"a": [1.0] * 32, "b": [1 / (j + 1) for j in range(32)], "c": [0.5**j for j in range(32)]}
    for rule in RULES:
        assert allocate_ranks(spectra, 8, rule=rule) == {n: 8 for n in spectra}
        assert allocate_ranks(mixed, 6, rule=rule) == allocate_ranks(
            dict(reversed(list(mixed.items()))), 6, rule=rule
        )


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
    with pytest.raises(RankAllocationError, match="rule"):
        allocate_ranks({"a": [1.0]}, 1, rule="waterfill")


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
    assert allocate_ranks(top, 4, rule="inverse_energy") == allocate_ranks(exact, 4, rule="inverse_energy")
    with pytest.raises(RankAllocationError, match="truncated"):
        allocate_ranks(top, 4)  # energy_target needs E(r) up to r_max = 16
    top16 = weight_spectra(model, ["q_proj", "up_proj"], top_k=16, niter=8)
    assert allocate_ranks(top16, 4) == allocate_ranks(exact, 4)
    with pytest.raises(RankAllocationError, match="truncated"):
        captured_energy(TruncatedSpectrum((1.0, 0.5), 2.0, 10), 3)


def test_energy_target_is_max_min_in_captured_energy():
    spectra = {f"m{i}": [1.0 / (1 + i * j) ** 0.7 for j in range(48)] for i in range(8)}
    spectra["flat"] = [1.0] * 48
    r0, budget = 6, 9 * 36
    ranks = allocate_ranks(spectra, r0)
    spent = sum(r * r for r in ranks.values())
    assert spent <= budget
    shares = {n: captured_energy(spectra[n], r) for n, r in ranks.items()}
    tau = min(shares.values())
    # each module has the smallest rank reaching tau, or more (the leftover budget), never less
    for n, r in ranks.items():
        curve = energy_curve(spectra[n], 4 * r0)
        smallest = next(k for k, e in enumerate(curve) if e >= tau - 1e-12)
        assert r >= smallest
    # the lowest share cannot be raised: its next rank does not fit the budget (or its cap)
    lowest = min(shares, key=lambda n: (shares[n], n))
    r = ranks[lowest]
    assert r == 4 * r0 or spent + 2 * r + 1 > budget
    assert rank_histogram(ranks) == {k: list(ranks.values()).count(k) for k in sorted(set(ranks.values()))}


def test_minilm_inverse_energy_is_uniform_and_energy_target_separates():
    """all-MiniLM-L6-v2 (the smoke NLU model), targets query/key/value/dense, r0 8: 37 matrices."""
    from test_lamda_helpers import minilm_cls

    spectra = weight_spectra(minilm_cls(), ["query", "key", "value", "dense"])
    assert len(spectra) == 37
    energies = [captured_energy(s, 8) for s in spectra.values()]
    assert 0.05 < min(energies) and max(energies) < 0.3  # E(8) spans only ~0.08-0.23
    assert set(allocate_ranks(spectra, 8, rule="inverse_energy").values()) == {8}
    ranks = allocate_ranks(spectra, 8)
    assert len(set(ranks.values())) >= 5 and sum(r * r for r in ranks.values()) <= 37 * 64
