"""LaMDA++ rank allocation from the normalized spectra of the pretrained weights.

For a weight with singular values sigma_i, p_i = sigma_i^2 / sum_j sigma_j^2 and
E(r) = sum_{i<=r} p_i is the energy a rank-r adapter direction set can capture. The default
gives more rank to modules whose spectrum is flat (a fixed rank r0 captures little energy):
each module gets a parameter share proportional to its score w = 1 - E(r0) (or E(r0) with
``direction='more_energy_more_rank'``) under the budget of uniform rank r0, then ranks are
clamped to [r_min, r_max] and rounded to integers without exceeding the budget.

Budgets: 'square' (LaMDA's S path, sum r_l^2 = N r0^2) or 'linear' (sum r_l = N r0, the LoRA
parameter budget when all modules have the same shape).
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

DIRECTIONS = ("less_energy_more_rank", "more_energy_more_rank")
BUDGETS = ("square", "linear")
RULES = ("energy_target", "inverse_energy")
DEFAULT_RULE = "energy_target"


class RankAllocationError(ValueError):
    """Rank allocation inputs are invalid or the budget cannot be met."""


@dataclass(frozen=True)
class TruncatedSpectrum:
    """The largest singular values of a matrix, its total energy (squared Frobenius norm) and rank bound.

    Enough for E(r) with r <= len(values), without a full SVD of a large matrix.
    """

    values: tuple[float, ...]
    total_energy: float
    max_rank: int


Spectrum = Union[Sequence[float], TruncatedSpectrum]


def _max_rank(spectrum: Spectrum) -> int:
    return spectrum.max_rank if isinstance(spectrum, TruncatedSpectrum) else len(spectrum)


def _sorted_energy(spectrum: Spectrum, r: int) -> tuple[torch.Tensor, float]:
    """(sigma^2 in descending order, total energy) of a spectrum whose energy up to rank ``r`` is
    asked for; RankAllocationError where the spectrum cannot give it."""
    values = spectrum.values if isinstance(spectrum, TruncatedSpectrum) else spectrum
    sigma = torch.as_tensor(values, dtype=torch.float64).flatten()
    if sigma.numel() == 0 or bool((sigma < 0).any()):
        raise RankAllocationError("a spectrum must be a non-empty list of non-negative singular values")
    energy = sigma.pow(2).sort(descending=True).values
    if isinstance(spectrum, TruncatedSpectrum):
        if r > sigma.numel() and sigma.numel() < spectrum.max_rank:
            raise RankAllocationError(f"a truncated spectrum of {sigma.numel()} values cannot give E({r})")
        return energy, float(spectrum.total_energy)
    return energy, float(energy.sum())


def captured_energy(spectrum: Spectrum, r: int) -> float:
    """E(r): fraction of sum sigma^2 captured by the r largest singular values."""
    energy, total = _sorted_energy(spectrum, r)
    if total == 0.0:
        return 1.0
    return min(1.0, float(energy[:r].sum()) / total)


def energy_curve(spectrum: Spectrum, upto: int) -> list[float]:
    """[E(0), E(1), ..., E(upto)]: captured-energy fractions of ranks 0..upto (as captured_energy)."""
    energy, total = _sorted_energy(spectrum, upto)
    if total == 0.0:
        return [1.0] * (upto + 1)
    cumulative = torch.cat([energy.new_zeros(1), energy.cumsum(0)])[: upto + 1] / total
    curve = [min(1.0, float(v)) for v in cumulative]
    return curve + [curve[-1]] * (upto + 1 - len(curve))


def allocate_ranks(
    spectra: Mapping[str, Spectrum],
    r0: int,
    *,
    rule: str = DEFAULT_RULE,
    r_min: int = 1,
    r_max: Optional[int] = None,
    direction: str = "less_energy_more_rank",
    budget: str = "square",
    total_budget: Optional[float] = None,
) -> dict[str, int]:
    """Per-module ranks from singular values, deterministic and within the uniform-r0 budget.

    ``spectra`` maps module names to singular values of the pretrained weight (all of them, or a
    TruncatedSpectrum with enough values: r0 for ``inverse_energy``, r_max for
    ``energy_target``). ``r_max`` defaults to 4 * r0 and is also capped by each matrix's rank
    bound. ``total_budget`` overrides N r0^2 (square) or N r0 (linear).

    Rules: ``energy_target`` (default) raises ranks one at a time, always for the module whose
    captured energy E_l(r_l) is lowest, while the budget allows: every module reaches a common
    share of its spectral energy, the highest the budget affords (``direction`` does not apply).
    ``inverse_energy``: rank^power proportional to 1 - E_l(r0) (or E_l(r0), see ``direction``).
    """
    if rule not in RULES:
        raise RankAllocationError(f"rule must be one of {RULES}, got {rule!r}")
    if not spectra:
        raise RankAllocationError("allocate_ranks needs at least one module spectrum")
    if not isinstance(r0, int) or r0 <= 0:
        raise RankAllocationError(f"r0 must be a positive integer, got {r0!r}")
    if direction not in DIRECTIONS:
        raise RankAllocationError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if budget not in BUDGETS:
        raise RankAllocationError(f"budget must be one of {BUDGETS}, got {budget!r}")
    r_max = 4 * r0 if r_max is None else r_max
    if not 1 <= r_min <= r_max:
        raise RankAllocationError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")

    names = sorted(spectra)
    power = 2 if budget == "square" else 1
    caps = {n: min(r_max, _max_rank(spectra[n])) for n in names}
    floors = {n: min(r_min, caps[n]) for n in names}
    limit = float(total_budget) if total_budget is not None else len(names) * r0**power
    if sum(floors[n] ** power for n in names) > limit + 1e-9:
        raise RankAllocationError(f"r_min={r_min} for {len(names)} modules exceeds the budget {limit:g}")

    if rule == "energy_target":
        return _energy_target(spectra, names, caps, floors, power, limit)

    scores = {}
    for n in names:
        e = captured_energy(spectra[n], r0)
        scores[n] = 1.0 - e if direction == "less_energy_more_rank" else e
    if all(s <= 0.0 for s in scores.values()):
        scores = {n: 1.0 for n in names}  # no information: fall back to uniform
    shares = {n: scores[n] ** (1.0 / power) for n in names}  # rank^power proportional to score

    def ranks_at(c: float) -> dict[str, float]:
        return {n: min(caps[n], max(floors[n], c * shares[n])) for n in names}

    def cost(ranks: Mapping[str, float]) -> float:
        return sum(v**power for v in ranks.values())

    low, high = 0.0, 1.0
    while cost(ranks_at(high)) < limit and high < 1e12 and any(ranks_at(high)[n] < caps[n] for n in names):
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if cost(ranks_at(mid)) <= limit else (low, mid)
    continuous = ranks_at(low)

    ranks = {n: max(floors[n], min(caps[n], math.floor(round(continuous[n], 9)))) for n in names}
    spent = cost(ranks)
    # Hand out the remaining budget one rank at a time, largest fractional part first.
    order = sorted(names, key=lambda n: (-(continuous[n] - ranks[n]), n))
    for n in order:
        step_cost = (ranks[n] + 1) ** power - ranks[n] ** power
        if ranks[n] < caps[n] and continuous[n] - ranks[n] > 1e-9 and spent + step_cost <= limit + 1e-9:
            ranks[n] += 1
            spent += step_cost
    return ranks


def _energy_target(spectra, names, caps, floors, power: int, limit: float) -> dict[str, int]:
    """Max-min share of spectral energy: raise the rank of the module with the lowest E_l(r_l).

    Starting from r_min, each step gives one more rank to the module whose captured energy is
    lowest (ties: the smaller rank, then the name) if that fits the budget and its cap; a module
    that cannot grow any more leaves the race. The result: r_l = min{r : E_l(r) >= tau} (clamped)
    for the highest common target tau the budget affords, then the rest of the budget to the
    modules with the lowest shares.
    """
    ranks = dict(floors)
    spent = sum(r**power for r in ranks.values())
    curves = {n: energy_curve(spectra[n], caps[n]) for n in names}
    heap = [(curves[n][ranks[n]], ranks[n], n) for n in names if ranks[n] < caps[n]]
    heapq.heapify(heap)
    while heap:
        _, rank, n = heapq.heappop(heap)
        step_cost = (rank + 1) ** power - rank**power
        if spent + step_cost > limit + 1e-9:
            continue  # cannot grow within the budget: out of the race
        ranks[n] = rank + 1
        spent += step_cost
        if ranks[n] < caps[n]:
            heapq.heappush(heap, (curves[n][ranks[n]], ranks[n], n))
    return ranks


def rank_histogram(ranks: Mapping[str, int]) -> dict[int, int]:
    """{rank: number of modules}, ranks ascending."""
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[int(rank)] = counts.get(int(rank), 0) + 1
    return dict(sorted(counts.items()))


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def weight_spectra(
    model: nn.Module, target_modules: Iterable[str] | str, top_k: Optional[int] = None, niter: int = 4
) -> dict[str, Spectrum]:
    """Singular values of every targeted nn.Linear / Conv1D weight, keyed by module name (fp32).

    Singular values do not depend on the layout, so Conv1D's transposed weight is used as stored.

    ``top_k=None``: all singular values (exact). Otherwise a TruncatedSpectrum with the ``top_k``
    largest from a randomized SVD (``niter`` power iterations) and the exact total energy, which
    is much faster for large matrices.
    """
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    spectra: dict[str, Spectrum] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and _matches(name, targets):
            with torch.no_grad():
                weight = module.weight.detach().float()
                if top_k is None:
                    spectra[name] = torch.linalg.svdvals(weight).tolist()
                    continue
                bound = min(weight.shape)
                k = min(top_k, bound)
                generator_state = torch.random.get_rng_state()
                torch.manual_seed(0)  # randomized SVD, but the same result on every call
                _, sigma, _ = torch.svd_lowrank(weight, q=min(k + 8, bound), niter=niter)
                torch.random.set_rng_state(generator_state)
                spectra[name] = TruncatedSpectrum(
                    tuple(sigma[:k].tolist()), float(weight.pow(2).sum()), bound
                )
    if not spectra:
        raise RankAllocationError(f"no linear module matches target_modules={target_modules!r}")
    return spectra


def rank_pattern_for_lamdapp(
    model: nn.Module, target_modules: Iterable[str] | str, r0: int, **allocation_options
) -> dict[str, int]:
    """LaMDA++ ranks of a model as a peft ``rank_pattern`` (exact module names as keys).

    The same dict can be passed to ``LoraConfig(rank_pattern=...)`` for LoRA baselines.
    """
    ranks = allocate_ranks(weight_spectra(model, target_modules), r0, **allocation_options)
    return {re.escape(name): rank for name, rank in ranks.items()}
