"""Throughput simulator: the schedulers of scheduler.py run on latency tables instead of a model.

Inputs, all measured by the suite on the device at hand (latency.py) or set by the config:

- latency tables t_embed(n), t_block(n), t_head(n), t_fill(n): seconds of one call over n items
  (t_block: one call of the model's block of K layers; for relaxed models also with the items
  spread over all B depths, ``block_mixed``, because per-depth LoRAs then run per group);
- the per-token exit-loop distribution (measured on held-out text, or observed by the engine);
- a memory-bound maximum batch (``memory_bound_batch``);
- the request workload.

Exit loops are drawn per token from the distribution with a seeded generator. Between measured
batch sizes the tables are interpolated linearly; below the smallest the smallest's time is used;
beyond the largest they are extrapolated from the last two points (a table of one size is
constant); the record says when a batch lay beyond the measured sizes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lamda_repro.recursive.serving.scheduler import ScheduleResult, Workload, WorkloadError, run_schedule

TABLE_NAMES = ("embed", "block", "block_mixed", "head", "fill", "emit")


class SimulatorError(ValueError):
    """Inconsistent simulator inputs (tables, distribution, memory)."""


@dataclass
class LatencyTable:
    """Seconds of one call over n items, at measured sizes (increasing)."""

    sizes: list[int]
    seconds: list[float]

    def __post_init__(self):
        if not self.sizes or len(self.sizes) != len(self.seconds):
            raise SimulatorError("a latency table needs as many times as sizes, and at least one")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:], strict=False)) or self.sizes[0] < 1:
            raise SimulatorError(f"latency table sizes must be increasing and >= 1, got {self.sizes}")
        if any(not (math.isfinite(t) and t >= 0) for t in self.seconds):
            raise SimulatorError("latency table times must be finite and >= 0")

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        sizes, secs = self.sizes, self.seconds
        if n <= sizes[0]:
            return secs[0]
        if n >= sizes[-1]:
            if len(sizes) == 1:  # one measured size: taken as constant
                return secs[0]
            slope = max(0.0, (secs[-1] - secs[-2]) / (sizes[-1] - sizes[-2]))
            return secs[-1] + slope * (n - sizes[-1])
        i = bisect.bisect_right(sizes, n)  # sizes[i - 1] <= n < sizes[i]
        share = (n - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return secs[i - 1] + share * (secs[i] - secs[i - 1])

    @classmethod
    def constant(cls, seconds: float) -> "LatencyTable":
        return cls([1], [float(seconds)])

    def to_dict(self) -> dict[str, list]:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}


@dataclass
class LatencyTables:
    """The tables of one model on one device."""

    embed: LatencyTable
    block: LatencyTable
    head: LatencyTable
    fill: LatencyTable
    block_mixed: LatencyTable | None = None  # relaxed models: items over all B depths
    emit: LatencyTable | None = None  # handing the chosen tokens to their sequences
    num_loops: int = 1
    step_s: dict[str, float] = field(default_factory=dict)  # scheduler work per step, by step_key
    meta: dict[str, Any] = field(default_factory=dict)

    def block_time(self, n: int, groups: int = 1) -> float:
        """t_block(n) with the items at ``groups`` distinct depths (interpolated between 1 and B)."""
        uniform = self.block(n)
        if self.block_mixed is None or groups <= 1 or self.num_loops <= 1:
            return uniform
        share = min(1.0, (groups - 1) / (self.num_loops - 1))
        return uniform + share * (self.block_mixed(n) - uniform)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name).to_dict() for name in TABLE_NAMES if getattr(self, name) is not None}
        return {**out, "num_loops": self.num_loops, "step_s": dict(self.step_s), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyTables":
        try:
            tables = {
                name: LatencyTable(list(data[name]["sizes"]), [float(v) for v in data[name]["seconds"]])
                for name in TABLE_NAMES
                if data.get(name) is not None
            }
            missing = [n for n in ("embed", "block", "head", "fill") if n not in tables]
        except (TypeError, KeyError) as exc:
            raise SimulatorError(f"malformed latency tables ({type(exc).__name__}: {exc})") from None
        if missing:
            raise SimulatorError(f"latency tables lack {missing}")
        return cls(
            **tables,
            num_loops=int(data.get("num_loops", 1)),
            step_s={k: float(v) for k, v in (data.get("step_s") or {}).items()},
            meta=dict(data.get("meta") or {}),
        )

    def scaled(self, factor: float, names: Sequence[str] = ("block", "block_mixed")) -> "LatencyTables":
        """A copy with the named tables' times multiplied by ``factor`` (e.g. layers per block)."""
        out = LatencyTables(
            **{n: getattr(self, n) for n in TABLE_NAMES}, num_loops=self.num_loops, step_s=dict(self.step_s)
        )
        for name in names:
            table = getattr(self, name)
            if table is not None:
                setattr(out, name, LatencyTable(table.sizes, [t * factor for t in table.seconds]))
        out.meta = dict(self.meta)
        return out

    def extrapolated_beyond(self, n: int) -> bool:
        return n > self.block.sizes[-1]


def step_key(scheduler: str, early_exit: bool) -> str:
    """The key of a scheduler's per-step overhead in ``LatencyTables.step_s``."""
    return scheduler + ("+exit" if early_exit else "")


def median_tables(rounds: Sequence[LatencyTables]) -> LatencyTables:
    """Element-wise median of tables measured several times at the same sizes."""
    if not rounds:
        raise SimulatorError("no latency tables to combine")
    first = rounds[0]

    def combine(name):
        tables = [getattr(t, name) for t in rounds]
        if tables[0] is None:
            return None
        seconds = [float(np.median([t.seconds[i] for t in tables])) for i in range(len(tables[0].sizes))]
        return LatencyTable(list(tables[0].sizes), seconds)

    step = {k: float(np.median([t.step_s[k] for t in rounds])) for k in first.step_s}
    return LatencyTables(
        **{name: combine(name) for name in TABLE_NAMES},
        num_loops=first.num_loops,
        step_s=step,
        meta={**first.meta, "rounds": len(rounds)},
    )


def check_distribution(distribution: Sequence[float] | None, num_loops: int) -> np.ndarray | None:
    if distribution is None:
        return None
    p = np.asarray(distribution, dtype=float)
    if p.shape != (num_loops,) or (p < 0).any() or not math.isclose(p.sum(), 1.0, abs_tol=1e-6):
        raise SimulatorError(
            f"exit distribution must be {num_loops} non-negative fractions summing to 1, "
            f"got {list(distribution)}"
        )
    return p / p.sum()


class SimulatedBackend:
    """A scheduler backend whose calls cost what the latency tables say; exits drawn per token."""

    def __init__(
        self,
        tables: LatencyTables,
        num_loops: int,
        max_batch: int,
        exit_distribution: Sequence[float] | None = None,
        seed: int = 0,
    ):
        self.tables, self.num_loops = tables, num_loops
        self.p = check_distribution(exit_distribution, num_loops)
        self.cdf = None if self.p is None else np.cumsum(self.p)[:-1]
        self.rng = np.random.default_rng(seed)
        self.planned = np.full(max_batch, num_loops - 1, dtype=np.int64)
        self.clock = 0.0
        self.step_cost = 0.0

    def admit(self, slot: int, request: int) -> None:
        pass

    def step(self) -> None:
        self.clock += self.step_cost

    def embed(self, slots: np.ndarray) -> None:
        self.clock += self.tables.embed(len(slots))
        if self.cdf is not None:  # inverse CDF: loop b with probability p_b
            self.planned[slots] = np.searchsorted(self.cdf, self.rng.random(len(slots)), side="right")

    def block(self, slots: np.ndarray, loops: np.ndarray) -> None:
        groups = 1
        if self.tables.block_mixed is not None and len(loops):
            groups = int(np.count_nonzero(np.bincount(loops)))
        self.clock += self.tables.block_time(len(slots), groups)

    def head(self, slots: np.ndarray, loops: np.ndarray, early_exit: bool) -> np.ndarray:
        self.clock += self.tables.head(len(slots))
        if not early_exit:
            return np.zeros(len(slots), dtype=bool)
        return loops >= self.planned[slots]

    def fill(self, slots: np.ndarray, loops: np.ndarray) -> None:
        self.clock += self.tables.fill(int((self.num_loops - 1 - loops).sum()))

    def emit(self, slots: np.ndarray) -> None:
        if self.tables.emit is not None:
            self.clock += self.tables.emit(len(slots))

    def now(self) -> float:
        return self.clock

    def wait_until(self, t: float) -> None:
        self.clock = max(self.clock, t)


def simulate(
    scheduler: str,
    workload: Workload,
    tables: LatencyTables,
    max_batch: int,
    exit_distribution: Sequence[float] | None = None,
    seed: int = 0,
    trace: bool = False,
) -> ScheduleResult:
    """Predicted decode of ``workload`` with ``scheduler``; early exit when a distribution is given."""
    early_exit = exit_distribution is not None
    backend = SimulatedBackend(tables, tables.num_loops, max_batch, exit_distribution, seed)
    backend.step_cost = tables.step_s.get(step_key(scheduler, early_exit), 0.0)
    return run_schedule(scheduler, workload, backend, max_batch, early_exit, trace)


class NullBackend:
    """A backend that does no work (for timing the schedulers' own bookkeeping): with early exit
    every second item leaves after its first loop."""

    def __init__(self, num_loops: int, clock):
        self.num_loops, self.clock = num_loops, clock

    def admit(self, slot, request):
        pass

    def embed(self, slots):
        pass

    def block(self, slots, loops):
        pass

    def head(self, slots, loops, early_exit):
        return (np.arange(len(slots)) % 2 == 0) & (loops == 0) if early_exit else np.zeros(len(slots), bool)

    def fill(self, slots, loops):
        pass

    def emit(self, slots):
        pass

    def step(self):
        pass

    def now(self):
        return self.clock()

    def wait_until(self, t):
        pass


# -- pure helpers ----------------------------------------------------------------------------


def memory_bound_batch(
    budget_bytes: float, weight_bytes: float, kv_bytes_per_sequence: float, cap: int | None = None
) -> int:
    """floor((budget - weights) / KV bytes per sequence), capped at ``cap``; >= 1 or an error."""
    if kv_bytes_per_sequence <= 0:
        raise SimulatorError("KV bytes per sequence must be > 0")
    fits = math.floor((budget_bytes - weight_bytes) / kv_bytes_per_sequence)
    if fits < 1:
        raise SimulatorError(
            f"memory budget of {budget_bytes / 2**20:.2f} MiB leaves no room for one sequence "
            f"(weights {weight_bytes / 2**20:.2f} MiB, "
            f"KV per sequence {kv_bytes_per_sequence / 2**20:.3f} MiB)"
        )
    return min(fits, cap) if cap is not None else fits


def depthwise_speedup_bound(num_loops: int, exit_distribution: Sequence[float]) -> float:
    """B / E[loops]: CDB with early exit over the same model without exit, at an equal, full batch
    and with block time independent of the batch (the memory-bound regime; head, embedding and
    KV filling free). Every token leaving after loop 1 gives B."""
    p = check_distribution(exit_distribution, num_loops)
    return num_loops / float(sum((b + 1) * q for b, q in enumerate(p)))


def prediction_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured."""
    if not measured:
        return math.nan
    return (predicted - measured) / measured


__all__ = [
    "TABLE_NAMES",
    "SimulatorError",
    "LatencyTable",
    "LatencyTables",
    "SimulatedBackend",
    "NullBackend",
    "median_tables",
    "simulate",
    "step_key",
    "memory_bound_batch",
    "depthwise_speedup_bound",
    "prediction_error",
    "WorkloadError",
]
