"""Batch schedulers for decoding a request workload: static batching, continuous sequence-wise
batching (CSB) and continuous depth-wise batching (CDB), each with or without early exit.

The schedulers only decide *which* items run together; a backend does the work. The same code
drives the real engine (``backends.EngineBackend``) and the throughput simulator
(``simulator.SimulatedBackend``), so both follow exactly the same schedule.

Vocabulary: a *slot* holds one sequence (at most ``max_batch`` slots); the sequence's *item* is
its token in flight and the loop b in 0 .. B-1 that token runs next. Prefill (the prompt) happens
when a request is admitted to a slot and gives its first token; decode steps give the rest.

static  admit up to max_batch requests, decode until all of them are done, then the next batch.
csb     a step runs every active item through all B loops; a finished sequence's slot is refilled
        before the next step.
cdb     a step is ONE call of the shared block: every item runs its own loop. An item that exits
        (confidence reached, or its last loop) emits its token and, in the same step, its slot
        gets the sequence's next token (or a new request when the sequence is done) at loop 0.

With early exit, an item runs the LM head after every loop and leaves at the loop the backend's
exit decision names; its skipped loops' KV entries are filled by the backend (``fill``).
Without early exit, the head runs after the last loop only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

SCHEDULERS = ("static", "csb", "cdb")
ARRIVALS = ("burst", "poisson")


class WorkloadError(ValueError):
    """The workload (requests, lengths, arrivals) or a scheduler setting is invalid."""


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order: prompt and generation lengths (tokens), arrival times (s)."""

    prompt_lens: tuple[int, ...]
    gen_lens: tuple[int, ...]
    arrivals: tuple[float, ...]

    def __post_init__(self):
        n = len(self.prompt_lens)
        if n == 0:
            raise WorkloadError("workload: no requests (num_requests must be >= 1)")
        if len(self.gen_lens) != n or len(self.arrivals) != n:
            raise WorkloadError("workload: prompt_lens, gen_lens and arrivals differ in length")
        if min(self.prompt_lens) < 1 or min(self.gen_lens) < 1:
            raise WorkloadError("workload: prompt and generation lengths must be >= 1")
        if any(b < a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)) or self.arrivals[0] < 0:
            raise WorkloadError("workload: arrival times must be non-negative and sorted")

    @property
    def num_requests(self) -> int:
        return len(self.prompt_lens)

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by decode steps (the first token of each request comes from prefill)."""
        return sum(self.gen_lens) - self.num_requests

    @property
    def max_context(self) -> int:
        return max(p + g for p, g in zip(self.prompt_lens, self.gen_lens, strict=True))

    @property
    def mean_context(self) -> float:
        """Mean KV length seen by a decode step: prompt plus half the generation, per request."""
        return float(np.mean([p + g / 2 for p, g in zip(self.prompt_lens, self.gen_lens, strict=True)]))


def _lengths(spec: Any, n: int, rng: np.random.Generator, key: str) -> list[int]:
    if isinstance(spec, bool) or not isinstance(spec, (int, list, tuple)):
        raise WorkloadError(f"workload.{key}: an integer or [min, max], got {spec!r}")
    if isinstance(spec, int):
        lo = hi = spec
    else:
        if len(spec) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
            raise WorkloadError(f"workload.{key}: [min, max] of integers, got {spec!r}")
        lo, hi = spec
    if lo < 1 or hi < lo:
        raise WorkloadError(f"workload.{key}: needs 1 <= min <= max, got {spec!r}")
    return rng.integers(lo, hi + 1, size=n).tolist()


def make_workload(
    num_requests: int,
    prompt_len: int | list[int],
    gen_len: int | list[int],
    arrival: str = "burst",
    rate: float | None = None,
    seed: int = 0,
) -> Workload:
    """A seeded workload. Lengths are fixed (int) or uniform in [min, max]; arrivals are all at
    time 0 (``burst``, the paper's queue) or a Poisson process of ``rate`` requests per second."""
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise WorkloadError(f"workload.num_requests: must be >= 1, got {num_requests!r}")
    rng = np.random.default_rng(seed)
    prompts = _lengths(prompt_len, num_requests, rng, "prompt_len")
    gens = _lengths(gen_len, num_requests, rng, "gen_len")
    if arrival == "burst":
        arrivals = [0.0] * num_requests
    elif arrival == "poisson":
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
            raise WorkloadError(f"workload.rate: poisson arrivals need a rate > 0, got {rate!r}")
        arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num_requests)).tolist()
    else:
        raise WorkloadError(f"workload.arrival: must be one of {ARRIVALS}, got {arrival!r}")
    return Workload(tuple(prompts), tuple(gens), tuple(float(a) for a in arrivals))


class Backend(Protocol):
    """What a scheduler asks of the machine that runs the model (real or simulated).

    Time-taking calls return the seconds they took (measured or looked up); ``now`` is the
    decode clock (prefill excluded)."""

    num_loops: int

    def admit(self, slot: int, request: int) -> None: ...
    def embed(self, slots: np.ndarray) -> None: ...
    def block(self, slots: np.ndarray, loops: np.ndarray) -> None: ...
    def head(self, slots: np.ndarray, loops: np.ndarray, early_exit: bool) -> np.ndarray: ...
    def fill(self, slots: np.ndarray, loops: np.ndarray) -> None: ...
    def emit(self, slots: np.ndarray) -> None: ...
    def step(self) -> None: ...
    def now(self) -> float: ...
    def wait_until(self, t: float) -> None: ...


@dataclass
class ScheduleResult:
    """What happened: tokens, time on the decode clock, and the shape of every block call."""

    scheduler: str
    early_exit: bool
    max_batch: int
    decode_tokens: int = 0
    decode_time_s: float = 0.0
    steps: int = 0
    block_call_sizes: list[int] = field(default_factory=list)
    exits_per_loop: list[int] = field(default_factory=list)
    refills: int = 0  # requests admitted into slots freed by earlier steps (continuous schedulers)
    trace: list[tuple[list[int], list[int]]] | None = None  # (slots, loops) of every block call

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_time_s if self.decode_time_s > 0 else math.nan

    @property
    def max_call_size(self) -> int:
        return max(self.block_call_sizes, default=0)

    def summary(self) -> dict[str, Any]:
        exits = np.asarray(self.exits_per_loop, dtype=float)
        return {
            "scheduler": self.scheduler,
            "early_exit": self.early_exit,
            "max_batch": self.max_batch,
            "decode_tokens": self.decode_tokens,
            "decode_time_s": self.decode_time_s,
            "tokens_per_s": self.tokens_per_s,
            "steps": self.steps,
            "block_calls": len(self.block_call_sizes),
            "mean_call_size": float(np.mean(self.block_call_sizes)) if self.block_call_sizes else 0.0,
            "max_call_size": self.max_call_size,
            "refills": self.refills,
            "exit_distribution": (exits / exits.sum()).tolist() if exits.sum() else [],
        }


class _Slots:
    """Per-slot bookkeeping shared by the schedulers (arrays over max_batch slots)."""

    def __init__(self, max_batch: int, workload: Workload, backend: Backend, result: ScheduleResult):
        self.active = np.zeros(max_batch, dtype=bool)
        self.remaining = np.zeros(max_batch, dtype=np.int64)  # decode tokens still to produce
        self.loop = np.zeros(max_batch, dtype=np.int64)
        self.next_request = 0
        self.workload, self.backend, self.result = workload, backend, result

    def pending(self) -> bool:
        return self.next_request < self.workload.num_requests

    def arrived(self) -> bool:
        return self.pending() and self.workload.arrivals[self.next_request] <= self.backend.now()

    def admit_arrived(self, limit: int | None = None) -> int:
        """Give free slots to requests that have arrived (at most ``limit``); return how many."""
        admitted = 0
        for slot in np.flatnonzero(~self.active):
            if (limit is not None and admitted >= limit) or not self.arrived():
                break
            request = self.next_request
            self.next_request += 1
            self.backend.admit(int(slot), request)
            remaining = self.workload.gen_lens[request] - 1
            if remaining == 0:  # the prefill token was the whole generation
                continue
            self.active[slot], self.remaining[slot], self.loop[slot] = True, remaining, 0
            admitted += 1
        return admitted

    def idle_if_needed(self) -> bool:
        """With nothing active, wait for the next arrival; False when no work is left at all."""
        if self.active.any():
            return True
        if not self.pending():
            return False
        if not self.arrived():
            self.backend.wait_until(self.workload.arrivals[self.next_request])
        return True

    def emit(self, slots: np.ndarray) -> None:
        self.backend.emit(slots)
        self.remaining[slots] -= 1
        self.result.decode_tokens += len(slots)
        done = slots[self.remaining[slots] == 0]
        self.active[done] = False


def _check(scheduler: str, max_batch: int, num_loops: int) -> None:
    if scheduler not in SCHEDULERS:
        raise WorkloadError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise WorkloadError(f"max_batch must be an integer >= 1, got {max_batch!r}")


def _exits(backend: Backend, slots: np.ndarray, loops: np.ndarray, early_exit: bool) -> np.ndarray:
    """Which items leave after this loop: the backend's decision with early exit (the head runs
    for every item), else the items at their last loop (the head runs for those only)."""
    last = loops == backend.num_loops - 1
    if early_exit:
        return backend.head(slots, loops, True) | last
    if last.any():
        backend.head(slots[last], loops[last], False)
    return last


def _record_call(result: ScheduleResult, slots: np.ndarray, loops: np.ndarray) -> None:
    result.block_call_sizes.append(len(slots))
    if result.trace is not None:
        result.trace.append((slots.tolist(), loops.tolist()))


def _sequence_step(s: _Slots, early_exit: bool) -> None:
    """One CSB/static step: every active item runs loops 0 .. B-1 (exited items drop out)."""
    backend = s.backend
    slots = np.flatnonzero(s.active)
    backend.embed(slots)
    alive = slots
    for b in range(backend.num_loops):
        loops = np.full(len(alive), b, dtype=np.int64)
        backend.block(alive, loops)
        _record_call(s.result, alive, loops)
        if not early_exit and b < backend.num_loops - 1:
            continue
        exits = _exits(backend, alive, loops, early_exit)
        s.result.exits_per_loop[b] += int(exits.sum())
        if b < backend.num_loops - 1 and exits.any():
            backend.fill(alive[exits], loops[exits])
        alive = alive[~exits]
        if not len(alive):
            break
    s.emit(slots)


def _depth_step(s: _Slots, early_exit: bool) -> None:
    """One CDB step: one block call over every active item at its own loop."""
    backend = s.backend
    slots = np.flatnonzero(s.active)
    loops = s.loop[slots]
    starting = slots[loops == 0]
    if len(starting):
        backend.embed(starting)
    backend.block(slots, loops)
    _record_call(s.result, slots, loops)
    exits = _exits(backend, slots, loops, early_exit)
    exited, exit_loops = slots[exits], loops[exits]
    for b, count in enumerate(np.bincount(exit_loops, minlength=backend.num_loops).tolist()):
        s.result.exits_per_loop[b] += count
    early = exit_loops < backend.num_loops - 1
    if early.any():
        backend.fill(exited[early], exit_loops[early])
    s.loop[slots[~exits]] += 1
    s.loop[exited] = 0  # the sequence's next token (or, once done, a new request) starts at loop 0
    s.emit(exited)


class Schedule:
    """A decoding run in progress: ``advance()`` performs the next step (with the admissions
    before it) and returns False once every request is done. ``run_schedule`` drives one to the
    end; a benchmark may advance several in turn (interleaved) so that they share machine load."""

    def __init__(
        self,
        scheduler: str,
        workload: Workload,
        backend: Backend,
        max_batch: int,
        early_exit: bool = False,
        trace: bool = False,
    ):
        _check(scheduler, max_batch, backend.num_loops)
        self.scheduler, self.workload, self.backend, self.early_exit = (
            scheduler,
            workload,
            backend,
            early_exit,
        )
        self.result = ScheduleResult(
            scheduler,
            early_exit,
            max_batch,
            exits_per_loop=[0] * backend.num_loops,
            trace=[] if trace else None,
        )
        self.slots = _Slots(max_batch, workload, backend, self.result)
        self.start = backend.now()
        self.done = False

    def advance(self) -> bool:
        slots, backend, result = self.slots, self.backend, self.result
        while not self.done:
            if self.scheduler == "static":
                if not slots.active.any():
                    if slots.pending() and not slots.arrived():
                        backend.wait_until(self.workload.arrivals[slots.next_request])
                    slots.admit_arrived()
            else:
                admitted = slots.admit_arrived()
                if result.steps:
                    result.refills += admitted
            if not slots.idle_if_needed():
                self._finish()
                break
            if not slots.active.any():
                continue
            backend.step()
            if self.scheduler == "cdb":
                _depth_step(slots, self.early_exit)
            else:
                _sequence_step(slots, self.early_exit)
            result.steps += 1
            return True
        return False

    def _finish(self) -> None:
        self.done = True
        self.result.decode_time_s = self.backend.now() - self.start
        made, wanted = self.result.decode_tokens, self.workload.decode_tokens
        if made != wanted:
            raise RuntimeError(f"{self.scheduler}: produced {made} of {wanted} tokens")


def run_schedule(
    scheduler: str,
    workload: Workload,
    backend: Backend,
    max_batch: int,
    early_exit: bool = False,
    trace: bool = False,
) -> ScheduleResult:
    """Decode ``workload`` on ``backend`` with ``scheduler``; the decode clock is the backend's.
    With ``trace`` the result lists the (slots, loops) of every block call."""
    schedule = Schedule(scheduler, workload, backend, max_batch, early_exit, trace)
    while schedule.advance():
        pass
    return schedule.result


__all__ = [
    "SCHEDULERS",
    "ARRIVALS",
    "WorkloadError",
    "Workload",
    "make_workload",
    "Backend",
    "ScheduleResult",
    "Schedule",
    "run_schedule",
]
