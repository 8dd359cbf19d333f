"""Latency tables measured with the engine's own calls: t_embed(n), t_block(n), t_head(n), t_fill(n),
t_emit(n), and the schedulers' own work per step.

Each call is timed over n items whose KV cache holds ``context`` tokens (the workload's mean
context: attention cost grows with it), median of ``repeats`` timed calls after ``warmup`` calls,
the sizes swept ``repeats`` times in turn so that drifting machine load hits every size alike,
every timed call preceded by a call of another kind (as in decoding). t_block uses all items at
one loop (loop 0, 1, ... in turn from call to call); for relaxed models ``block_mixed`` spreads
them over all B loops (the per-depth LoRAs then run per group, as in depth-wise batching). t_head
includes the softmax confidence the exit rule reads. t_fill is per (item, skipped loop) row of the
KV policy. The calls are those of the real backend (engine.py + backend.py), with its indexing;
the schedulers' bookkeeping per step is timed on a backend that does nothing (``step_s``).

``geometry_model`` builds a randomly initialised decoder of a published geometry with only the
layers one block call needs, so paper-scale tables can be measured without the weights.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from lamda_repro.recursive.serving.backend import EngineBackend
from lamda_repro.recursive.serving.scheduler import SCHEDULERS, Workload, run_schedule
from lamda_repro.recursive.serving.simulator import LatencyTable, LatencyTables, NullBackend, step_key

# Published decoder geometries (config.json of the Hub models; Table 1 of the paper).
GEOMETRIES: dict[str, dict[str, Any]] = {
    "gemma-2b": {
        "model_type": "gemma",
        "num_layers": 18,
        "hidden_size": 2048,
        "num_heads": 8,
        "num_kv_heads": 1,
        "head_dim": 256,
        "intermediate_size": 16384,
        "vocab_size": 256000,
        "tie_word_embeddings": True,
    },
    "tinyllama-1.1b": {
        "model_type": "llama",
        "num_layers": 22,
        "hidden_size": 2048,
        "num_heads": 32,
        "num_kv_heads": 4,
        "head_dim": 64,
        "intermediate_size": 5632,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    # not published: a tiny Llama for running the GPU check on a CPU in the tests
    "tiny": {
        "model_type": "llama",
        "num_layers": 4,
        "hidden_size": 32,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "vocab_size": 256,
        "tie_word_embeddings": False,
    },
}


def default_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch``, and ``max_batch`` itself."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_overhead(num_loops: int, max_batch: int, clock, repeats: int = 3) -> dict[str, float]:
    """Seconds the schedulers themselves spend per step (bookkeeping, no model work), per
    scheduler with and without early exit, on a synthetic workload that keeps ``max_batch`` busy."""
    n = 4 * max_batch
    workload = Workload((1,) * n, (9,) * n, (0.0,) * n)
    out = {}
    for scheduler in SCHEDULERS:
        for early_exit in (False, True) if num_loops > 1 else (False,):
            per_step = []
            for _ in range(repeats):
                backend = NullBackend(num_loops, clock)
                start = clock()
                result = run_schedule(scheduler, workload, backend, max_batch, early_exit)
                per_step.append((clock() - start) / result.steps)
            out[step_key(scheduler, early_exit)] = statistics.median(per_step)
    return out


class TableSampler:
    """Times the backend's calls of one model, one (call, batch size) cell at a time, so that the
    sampling can be spread over a benchmark (interleaved with the runs it predicts); ``tables()``
    gives the medians. The cells cycle over the call kinds within a size, so every timed call
    follows a call of another kind, as in decoding."""

    def __init__(
        self, model: nn.Module, context: int, sizes: list[int], kv_policy: str = "copy_state", seed=0
    ):
        import numpy as np

        if not sizes or min(sizes) < 1:
            raise ValueError(f"latency sizes must be >= 1, got {sizes}")
        self.sizes = sorted(set(sizes))
        n_max = self.sizes[-1]
        self.context, self.kv_policy = context, kv_policy
        backend = EngineBackend(model, [[0]], n_max, context + 1, threshold=0.5, kv_policy=kv_policy)
        self.backend, engine, g = backend, backend.engine, backend.engine.geometry
        self.geometry, self.device = g, backend.device
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=generator).to(device=self.device, dtype=engine.dtype)

        engine.k_cache.copy_(rand(*engine.k_cache.shape))
        engine.v_cache.copy_(rand(*engine.v_cache.shape))
        backend.hidden.copy_(rand(n_max, g.hidden_size))
        backend.next_input.copy_(
            torch.randint(0, g.vocab_size, (n_max,), generator=generator).to(self.device)
        )
        backend.token_pos.fill_(context)
        backend.request_of[:] = 0
        slots = np.arange(n_max)
        zeros = np.zeros(n_max, dtype=np.int64)
        mixed = np.arange(n_max) % g.num_loops
        before_last = np.full(n_max, max(0, g.num_loops - 2), dtype=np.int64)
        turn = iter(range(1 << 62))

        def block(n):  # all items at one loop; the loop changes from call to call, as in decoding
            backend.block(slots[:n], zeros[:n] + next(turn) % g.num_loops)

        def emit(n):
            backend.emit(slots[:n])

        self.calls = {
            "embed": lambda n: backend.embed(slots[:n]),
            "block": block,
            "head": lambda n: backend.head(slots[:n], zeros[:n], True),
            "emit": emit,
        }
        if g.num_loops > 1:
            self.calls["fill"] = lambda n: backend.fill(slots[:n], before_last[:n])
            if g.relaxed:
                self.calls["block_mixed"] = lambda n: backend.block(slots[:n], mixed[:n])
        self.cells = [(name, n) for n in self.sizes for name in self.calls]
        self.times: dict[tuple[str, int], list[float]] = {cell: [] for cell in self.cells}
        self._next = 0

    @torch.no_grad()
    def warmup(self, calls: int = 2) -> None:
        for fn in self.calls.values():
            for _ in range(calls):
                for n in (self.sizes[0], self.sizes[-1]):
                    fn(n)
                    self._reset()

    def _reset(self) -> None:
        self.backend.token_pos.fill_(self.context)  # emit advances it; keep the KV length fixed
        self.backend.generated[0].clear()

    @torch.no_grad()
    def sample(self) -> None:
        """Time the next cell once."""
        name, n = self.cells[self._next]
        self._next = (self._next + 1) % len(self.cells)
        clock = self.backend.clock
        _sync(self.device)
        start = clock()
        self.calls[name](n)
        _sync(self.device)
        self.times[(name, n)].append(clock() - start)
        if name == "emit":
            self._reset()

    def sweep(self, repeats: int = 1) -> None:
        for _ in range(repeats * len(self.cells)):
            self.sample()

    def tables(self) -> LatencyTables:
        if any(not t for t in self.times.values()):
            self.sweep()
        tables = {
            name: LatencyTable(self.sizes, [statistics.median(self.times[(name, n)]) for n in self.sizes])
            for name in self.calls
        }
        if "fill" not in tables:
            tables["fill"] = LatencyTable([1], [0.0])
        g = self.geometry
        meta = {
            "context": self.context,
            "samples_per_cell": min(len(t) for t in self.times.values()),
            "kv_policy": self.kv_policy,
            "device": device_name(self.device),
            "clock": self.backend.clock_name,
            "dtype": str(self.backend.engine.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "layers_per_block_call": g.num_shared,
            "num_layers": g.num_layers,
            "relaxed": g.relaxed,
        }
        step_s = measure_step_overhead(g.num_loops, self.sizes[-1], self.backend.clock)
        return LatencyTables(**tables, num_loops=g.num_loops, step_s=step_s, meta=meta)


def measure_tables(
    model: nn.Module,
    context: int,
    sizes: list[int],
    repeats: int = 5,
    warmup: int = 2,
    kv_policy: str = "copy_state",
    seed: int = 0,
) -> LatencyTables:
    """Latency tables of ``model`` at the given batch sizes and KV length ``context``: every cell
    timed ``repeats`` times after ``warmup`` calls of each kind (TableSampler in one go)."""
    sampler = TableSampler(model, context, sizes, kv_policy, seed)
    sampler.warmup(warmup)
    sampler.sweep(repeats)
    tables = sampler.tables()
    tables.meta.update(repeats=repeats, warmup=warmup)
    return tables


def device_name(device: torch.device) -> str:
    """The device as a reader needs it: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu ({cpu}; {torch.get_num_threads()} torch threads)"


def geometry_config(name: str, num_layers: int | None = None, vocab_size: int | None = None):
    """The transformers config of published geometry ``name`` (optionally fewer layers / a vocabulary)."""
    from transformers import AutoConfig

    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r} (known: {', '.join(GEOMETRIES)})")
    geo = GEOMETRIES[name]
    return AutoConfig.for_model(
        geo["model_type"],
        vocab_size=vocab_size or geo["vocab_size"],
        hidden_size=geo["hidden_size"],
        intermediate_size=geo["intermediate_size"],
        num_hidden_layers=num_layers or geo["num_layers"],
        num_attention_heads=geo["num_heads"],
        num_key_value_heads=geo["num_kv_heads"],
        head_dim=geo["head_dim"],
        tie_word_embeddings=geo["tie_word_embeddings"],
        max_position_embeddings=8192,
    )


def geometry_model(
    name: str, num_layers: int, num_loops: int = 1, lora_rank: int | None = None, seed: int = 0
) -> nn.Module:
    """A random-init decoder of geometry ``name`` with ``num_layers`` layers (recursive with
    ``num_loops`` > 1, relaxed with ``lora_rank``) and a 256-token vocabulary: the block's cost
    does not depend on the vocabulary, and the paper's throughput counts the blocks only."""
    from transformers import AutoModelForCausalLM

    from lamda_repro.recursive.convert import convert_to_recursive

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(geometry_config(name, num_layers, vocab_size=256)).eval()
    if num_loops > 1:
        model = convert_to_recursive(
            model, num_loops, init="lower", lora_rank=lora_rank, lora_init="zero", inplace=lora_rank is None
        ).eval()
    return model


__all__ = [
    "TableSampler",
    "GEOMETRIES",
    "default_sizes",
    "measure_tables",
    "device_name",
    "geometry_config",
    "geometry_model",
]
