"""Linear algebra of depth-wise relaxations: factors, rank caps, parameter costs, rank allocation.

For one tied matrix position (a shared layer's map) with shared weight W and the original weights
W_1..W_B of its B depths, the residuals are D_k = W_k - W (each d_out x d_in). Three relaxations
approximate them:

    lora          D_k ~ B_k A_k, rank-r SVD of D_k            r (d_in + d_out)            per depth
    lamda_depth   D_k ~ U_k S_k V_k^T, SVD of D_k (S_k trains) r (d_in + d_out) + r^2     per depth
    shared_basis  D_k ~ U S_k V^T, U and V shared by the B     r_out d_out + r_in d_in
                  depths, S_k = U^T D_k V                        + B r_out r_in            per position

U holds the top r_out left singular vectors of [D_1 ... D_B] (side by side), V the top r_in right
singular vectors of [D_1; ...; D_B] (stacked); for those bases S_k = U^T D_k V is the core of
least Frobenius error. Exactness needs r_out = rank([D_1 ... D_B]) <= min(d_out, B d_in) and
r_in = rank([D_1; ...; D_B]) <= min(d_in, B d_out), which can exceed min(d_in, d_out).

Everything here is a pure function of tensors and integers (no modules), so the relaxation code
(relax.py), the closed-form counts (counts.py) and the weight-error comparison (relax_error.py)
share one definition. SVDs run in float64 on CPU (float32 elsewhere).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lamda_repro.recursive.spec import RecursiveConfigError

RELAXATIONS = ("lora", "lamda_depth", "shared_basis")
ALLOCATIONS = ("uniform", "spectral")


class RelaxationError(RecursiveConfigError):
    """An invalid relaxation setting; ``field`` names the setting (kind, rank, rank_in, budget, ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_kind(kind: str) -> None:
    if kind not in RELAXATIONS:
        raise RelaxationError("kind", f"unknown relaxation {kind!r} (known: {', '.join(RELAXATIONS)})")


# -- shapes: caps and costs ----------------------------------------------------------------------


def rank_caps(kind: str, d_in: int, d_out: int, num_depths: int) -> tuple[int, int]:
    """(largest useful r_out, largest useful r_in) of one tied map under ``kind``.

    lora / lamda_depth: min(d_in, d_out) for both (one residual's rank). shared_basis: the ranks
    of the side-by-side and the stacked residual matrices, min(d_out, B d_in) and min(d_in, B d_out).
    """
    check_kind(kind)
    if kind == "shared_basis":
        return min(d_out, num_depths * d_in), min(d_in, num_depths * d_out)
    cap = min(d_in, d_out)
    return cap, cap


def level_ranks(kind: str, level: int, caps: tuple[int, int], rank_in: int | None = None) -> tuple[int, int]:
    """(r_out, r_in) that a uniform rank ``level`` gives a map with ``caps`` (each capped)."""
    r_out = min(level, caps[0])
    r_in = min(level if rank_in is None else rank_in, caps[1])
    if kind != "shared_basis":
        r_in = r_out
    return r_out, r_in


def unit_cost(kind: str, d_in: int, d_out: int, r_out: int, r_in: int, num_depths: int) -> int:
    """Parameters of one relaxation unit: a (position, map) for lora / lamda_depth, a (shared layer,
    map) with its ``num_depths`` positions for shared_basis."""
    check_kind(kind)
    if kind == "lora":
        return r_out * (d_in + d_out)
    if kind == "lamda_depth":
        return r_out * (d_in + d_out) + r_out * r_in
    return r_out * d_out + r_in * d_in + num_depths * r_out * r_in


@dataclass(frozen=True)
class Unit:
    """One relaxation unit: its key (``<unit index>/<map name>``), shape and depth count."""

    key: str
    d_in: int
    d_out: int
    num_depths: int


def units_of(kind: str, maps: dict[str, tuple[int, int]], num_layers: int, num_loops: int) -> list[Unit]:
    """The relaxation units of a model with ``num_layers`` positions and ``num_loops`` loops.

    ``maps`` is {map name: (d_in, d_out)} of one decoder layer. lora / lamda_depth: one unit per
    position and map (key ``<position>/<map>``); shared_basis: one per shared layer and map
    (key ``<shared index>/<map>``), each with num_loops depths.
    """
    check_kind(kind)
    if kind == "shared_basis":
        count, depths = num_layers // num_loops, num_loops
    else:
        count, depths = num_layers, 1
    return [
        Unit(f"{index}/{name}", d_in, d_out, depths)
        for index in range(count)
        for name, (d_in, d_out) in maps.items()
    ]


def uniform_ranks(
    kind: str, units: Sequence[Unit], level: int, rank_in: int | None = None
) -> dict[str, tuple[int, int]]:
    """{unit key: (r_out, r_in)} for a uniform rank ``level`` (each map capped)."""
    return {
        u.key: level_ranks(kind, level, rank_caps(kind, u.d_in, u.d_out, u.num_depths), rank_in)
        for u in units
    }


def total_cost(kind: str, units: Sequence[Unit], ranks: dict[str, tuple[int, int]]) -> int:
    """Closed-form parameter count of a relaxation with per-unit ranks ``ranks``."""
    return sum(unit_cost(kind, u.d_in, u.d_out, *ranks[u.key], u.num_depths) for u in units)


def max_level(kind: str, units: Sequence[Unit]) -> int:
    """The largest uniform rank that changes anything (the largest cap over the maps)."""
    return max(max(rank_caps(kind, u.d_in, u.d_out, u.num_depths)) for u in units)


def check_uniform_rank(kind: str, units: Sequence[Unit], rank: int, rank_in: int | None = None) -> None:
    """RelaxationError when ``rank`` (or ``rank_in``) exceeds what every map's residuals allow."""
    caps = [rank_caps(kind, u.d_in, u.d_out, u.num_depths) for u in units]
    top_out, top_in = max(c[0] for c in caps), max(c[1] for c in caps)
    if kind != "shared_basis":
        top_out = max(top_out, top_in)
    if rank > top_out:
        raise RelaxationError(
            "rank",
            f"rank {rank} exceeds what the residuals allow: at most {top_out} for {kind} on this model",
        )
    if rank_in is not None and rank_in > top_in:
        raise RelaxationError(
            "rank_in", f"rank_in {rank_in} exceeds what the stacked residuals allow: at most {top_in}"
        )


def budget_level(kind: str, units: Sequence[Unit], budget: int) -> int:
    """The largest uniform rank whose relaxation costs at most ``budget`` parameters.

    RelaxationError when even rank 1 costs more, or when the budget exceeds what full rank uses
    (no rank spends it: give a rank instead).
    """
    top = max_level(kind, units)
    low_cost = total_cost(kind, units, uniform_ranks(kind, units, 1))
    if budget < low_cost:
        raise RelaxationError(
            "budget", f"budget {budget:,} is below the smallest {kind} relaxation (rank 1: {low_cost:,})"
        )
    full_cost = total_cost(kind, units, uniform_ranks(kind, units, top))
    if budget > full_cost:
        raise RelaxationError(
            "budget",
            f"budget {budget:,} exceeds what full-rank {kind} uses ({full_cost:,}); give a rank instead",
        )
    lo, hi = 1, top  # cost is non-decreasing in the level: bisect for the last level within budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total_cost(kind, units, uniform_ranks(kind, units, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- factors -------------------------------------------------------------------------------------


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    work = matrix.double() if matrix.device.type == "cpu" else matrix.float()
    return torch.linalg.svd(work, full_matrices=False)


def svd_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-``rank`` approximation of ``residual``: B = U_r S_r, A = V_r^T."""
    U, S, Vh = _svd(residual)
    return U[:, :rank] * S[:rank], Vh[:rank]


def shared_bases(
    residuals: Sequence[torch.Tensor], rank_out: int, rank_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V^T): top ``rank_out`` left singular vectors of [D_1 ... D_B] and top ``rank_in`` right
    singular vectors of [D_1; ...; D_B]. With one residual both come from the same SVD."""
    if len(residuals) == 1:
        U, _, Vh = _svd(residuals[0])
        return U[:, :rank_out], Vh[:rank_in]
    U, _, _ = _svd(torch.cat(list(residuals), dim=1))
    _, _, Vh = _svd(torch.cat(list(residuals), dim=0))
    return U[:, :rank_out], Vh[:rank_in]


class Decomposition:
    """The factors of one unit's residuals up to its rank caps, truncated on demand.

    lora / lamda_depth: the SVD U diag(sigma) V^T of the single residual. shared_basis: the shared
    bases U (d_out x cap_out), V^T (cap_in x d_in) and the full cores U^T D_k V, whose top-left
    r_out x r_in block is the core of the truncated bases (so one decomposition serves every rank).
    """

    def __init__(self, kind: str, residuals: Sequence[torch.Tensor], caps: tuple[int, int]):
        check_kind(kind)
        self.kind, self.caps = kind, caps
        if kind == "shared_basis":
            self.U, self.Vt = shared_bases(residuals, caps[0], caps[1])
            self.cores = [self.U.T @ d.to(self.U.dtype) @ self.Vt.T for d in residuals]
        else:
            if len(residuals) != 1:
                raise ValueError(f"{kind} relaxes one residual per unit, got {len(residuals)}")
            self.U, self.sigma, self.Vt = _svd(residuals[0])

    def lora(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) = (U_r S_r, V_r^T), the lora factors."""
        return self.U[:, :rank] * self.sigma[:rank], self.Vt[:rank]

    def spectral(self, rank_out: int, rank_in: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(U, [S_k], V^T): lamda_depth gives S = diag(sigma_r) (one core), shared_basis U^T D_k V."""
        if self.kind == "shared_basis":
            return self.U[:, :rank_out], [c[:rank_out, :rank_in] for c in self.cores], self.Vt[:rank_in]
        return self.U[:, :rank_out], [torch.diag(self.sigma[:rank_out])], self.Vt[:rank_out]

    def approximations(self, rank_out: int, rank_in: int) -> list[torch.Tensor]:
        """The relaxed residuals at (rank_out, rank_in), one per depth of the unit."""
        if self.kind == "lora":
            B, A = self.lora(rank_out)
            return [B @ A]
        U, cores, Vt = self.spectral(rank_out, rank_in)
        return [U @ s @ Vt for s in cores]

    def energy_curve(self) -> torch.Tensor:
        """c[t] = squared Frobenius norm of the residuals captured at uniform level t (t = 0..max cap).

        One residual: cumulative sigma_i^2. shared_basis: sum_k ||U_t^T D_k V_t||^2 with U_t, V_t
        the top min(t, cap_out) / min(t, cap_in) shared directions (2-D prefix sums of the cores).
        """
        if self.kind != "shared_basis":
            energy = torch.cumsum(self.sigma.pow(2), 0)[: self.caps[0]]
            return torch.cat([energy.new_zeros(1), energy])
        squared = sum(c.pow(2) for c in self.cores)
        prefix = squared.cumsum(0).cumsum(1)
        curve = [squared.new_zeros(())]
        for t in range(1, max(self.caps) + 1):
            curve.append(prefix[min(t, self.caps[0]) - 1, min(t, self.caps[1]) - 1])
        return torch.stack(curve)


def lamda_depth_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_r^T) of ``residual``'s SVD; S_r = diag(sigma_1..sigma_r) is the trainable core."""
    cap = min(residual.shape)
    U, (S,), Vt = Decomposition("lamda_depth", [residual], (cap, cap)).spectral(rank, rank)
    return U, S, Vt


def shared_basis_factors(
    residuals: Sequence[torch.Tensor], rank_out: int, rank_in: int
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(U, [S_1..S_B], V^T) with S_k = U^T D_k V, the least-error core for the shared bases."""
    U, Vt = shared_bases(residuals, rank_out, rank_in)
    return U, [U.T @ d.to(U.dtype) @ Vt.T for d in residuals], Vt


def allocate_spectral(
    kind: str, units: Sequence[Unit], budget: int, gains: dict[str, torch.Tensor]
) -> dict[str, tuple[int, int]]:
    """Per-unit ranks under ``budget``: every unit starts at rank 1, then the rank step that
    captures the most residual energy per added parameter is taken while it fits (greedy).

    ``gains[key][t]`` is the squared Frobenius norm of the unit's residuals captured at level t
    (``Decomposition.energy_curve``). Captured energy is what the squared error of the relaxed
    weights loses, so the greedy spends the budget where the residuals' spectra are heavy: the
    LaMDA++ idea (ranks from spectra under a total budget) applied to the residuals, with the
    total relative Frobenius error of the relaxed weights as the objective.
    """
    ranks = uniform_ranks(kind, units, 1)
    spent = total_cost(kind, units, ranks)
    if budget < spent:
        raise RelaxationError(
            "budget", f"budget {budget:,} is below the smallest {kind} relaxation (rank 1: {spent:,})"
        )
    caps = {u.key: rank_caps(kind, u.d_in, u.d_out, u.num_depths) for u in units}
    level = {u.key: 1 for u in units}
    by_key = {u.key: u for u in units}

    def step(key: str) -> tuple[float, int] | None:
        u, t = by_key[key], level[key]
        if t >= max(caps[key]):
            return None
        nxt = level_ranks(kind, t + 1, caps[key])
        cost = unit_cost(kind, u.d_in, u.d_out, *nxt, u.num_depths) - unit_cost(
            kind, u.d_in, u.d_out, *ranks[key], u.num_depths
        )
        gain = float(gains[key][t + 1] - gains[key][t])
        return gain / cost, cost

    heap: list[tuple[float, int, str]] = []
    for i, u in enumerate(units):
        nxt = step(u.key)
        if nxt is not None:
            heapq.heappush(heap, (-nxt[0], i, u.key))
    order = {u.key: i for i, u in enumerate(units)}
    while heap:
        _, _, key = heapq.heappop(heap)
        nxt = step(key)
        if nxt is None:
            continue
        _, cost = nxt
        if spent + cost > budget:
            continue  # its next step never gets cheaper and the budget only shrinks: done
        spent += cost
        level[key] += 1
        ranks[key] = level_ranks(kind, level[key], caps[key])
        again = step(key)
        if again is not None:
            heapq.heappush(heap, (-again[0], order[key], key))
    return ranks


def relative_error(originals: Sequence[torch.Tensor], approximations: Sequence[torch.Tensor]) -> float:
    """sqrt(sum ||W - W_hat||^2) / sqrt(sum ||W||^2) over matrices (float64)."""
    with torch.no_grad():
        num = sum(
            float((w.double() - a.double()).pow(2).sum())
            for w, a in zip(originals, approximations, strict=True)
        )
        den = sum(float(w.double().pow(2).sum()) for w in originals)
    return (num / den) ** 0.5 if den > 0 else 0.0


__all__ = [
    "RELAXATIONS",
    "ALLOCATIONS",
    "RelaxationError",
    "Unit",
    "units_of",
    "rank_caps",
    "level_ranks",
    "unit_cost",
    "uniform_ranks",
    "total_cost",
    "max_level",
    "check_uniform_rank",
    "budget_level",
    "svd_factors",
    "shared_bases",
    "Decomposition",
    "lamda_depth_factors",
    "shared_basis_factors",
    "allocate_spectral",
    "relative_error",
]
