"""Roofline latency of one decoder-layer call on a named accelerator, as latency tables.

A decode step of a memory-bound model costs the bytes it moves through HBM, not the tokens it
computes; a CPU table cannot show that, so the paper-geometry estimate can use this model instead.
One call of one decoder layer over n items (tokens in flight, each at its own depth, each with a KV
cache of ``context`` tokens) takes

    t(n) = max(bytes(n) / HBM bandwidth, FLOPs(n) / peak dense bf16 FLOP/s) + launch overhead

with (e = bytes per element, W = weights of the layer's linear maps, V = its norm vectors,
D = parameters of one depth's delta (LoRA or spectral) on those maps, g = distinct depths among
the items, c = KV length, H / Hkv query / key-value heads of dimension d):

    FLOPs(n) = 2 n W + 2 n D + 4 n H d c                   (matmuls, deltas, QK^T and PV)
    bytes(n) = e [W + V + g D                                (weights: shared once, deltas per depth)
                  + n sum_maps (d_in + d_out) (1 + [D > 0])  (each map reads its input, writes its output)
                  + 2 n Hkv d c]                              (the KV cache read by attention)

The KV-policy fill row (``copy_state``: the k and v maps of one skipped position) is the same
with only the k and v maps and no attention. Left out: element-wise work (norms, rotary,
activation, residual adds, softmax), sampling, the embedding and LM head (the paper counts
Transformer blocks only), kernel efficiency below peak, caches (L2 reuse of the weights across
calls), overlap of launches with work, and the scheduler's own time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lamda_repro.recursive.serving.simulator import LatencyTable, LatencyTables

# A fixed per-layer-call cost: the launch latency of the layer's kernels (about ten of a few
# microseconds each, issued back to back). An assumption of the model, not a measurement.
LAUNCH_OVERHEAD_S = 10e-6


@dataclass(frozen=True)
class Accelerator:
    """Peak dense bf16 tensor FLOP/s, HBM bandwidth (bytes/s) and memory (bytes) of a GPU."""

    name: str
    peak_flops: float
    bandwidth: float
    memory_bytes: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Vendor data sheets. The H100 sheet prints bf16 tensor throughput with 2:4 sparsity (1,979
# TFLOPS); the dense peak is half of it. See docs/serving.md for how each number was read.
ACCELERATORS: dict[str, Accelerator] = {
    "a100-40gb": Accelerator(
        "NVIDIA A100 40GB SXM",
        312e12,
        1555e9,
        40e9,
        "NVIDIA A100 Tensor Core GPU data sheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), "
        "GPU memory bandwidth 1,555 GB/s (A100 40GB SXM)",
    ),
    "a100-80gb": Accelerator(
        "NVIDIA A100 80GB SXM",
        312e12,
        2039e9,
        80e9,
        "NVIDIA A100 Tensor Core GPU data sheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), "
        "GPU memory bandwidth 2,039 GB/s (A100 80GB SXM)",
    ),
    "h100-sxm": Accelerator(
        "NVIDIA H100 SXM",
        989.5e12,
        3.35e12,
        80e9,
        "NVIDIA H100 Tensor Core GPU data sheet: BF16 Tensor Core 1,979 TFLOPS with sparsity "
        "(dense: half, 989.5), GPU memory bandwidth 3.35 TB/s, 80 GB (H100 SXM)",
    ),
}


def accelerator(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r} (known: {', '.join(ACCELERATORS)})")
    return ACCELERATORS[name]


def layer_maps(geometry: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{map: (d_in, d_out)} of a Llama/Gemma decoder layer (attention and gated MLP)."""
    h, f = geometry["hidden_size"], geometry["intermediate_size"]
    q, kv = geometry["num_heads"] * geometry["head_dim"], geometry["num_kv_heads"] * geometry["head_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, f),
        "up_proj": (h, f),
        "down_proj": (f, h),
    }


def lora_delta_parameters(maps: dict[str, tuple[int, int]], rank: int) -> dict[str, int]:
    """Parameters of one depth's LoRA of rank ``rank`` per map: r (d_in + d_out) (rank capped)."""
    return {name: min(rank, i, o) * (i + o) for name, (i, o) in maps.items()}


@dataclass(frozen=True)
class CallCost:
    """FLOPs and bytes of one call; ``seconds`` on an accelerator."""

    flops: float
    bytes: float

    def seconds(self, acc: Accelerator, launch_overhead_s: float = LAUNCH_OVERHEAD_S) -> float:
        return max(self.bytes / acc.bandwidth, self.flops / acc.peak_flops) + launch_overhead_s


def _maps_cost(maps, delta, n: int, groups: int, element_bytes: int) -> tuple[float, float]:
    weights = sum(i * o for i, o in maps.values())
    deltas = sum(delta.get(name, 0) for name in maps)
    flops = 2 * n * (weights + deltas)
    passes = 2 if deltas else 1  # a delta reads the map's input and writes its output once more
    elements = weights + groups * deltas + n * passes * sum(i + o for i, o in maps.values())
    return flops, elements * element_bytes


def layer_call_cost(
    geometry: dict[str, Any],
    n: int,
    context: int,
    element_bytes: int = 2,
    delta: dict[str, int] | None = None,
    depths: int = 1,
) -> CallCost:
    """One decoder layer over ``n`` items with KV length ``context``, the items at ``depths``
    distinct depths (each depth present reads its own ``delta``: parameters per map)."""
    if n < 0 or context < 0 or depths < 1:
        raise ValueError(f"need n >= 0, context >= 0, depths >= 1 (got {n}, {context}, {depths})")
    if n == 0:
        return CallCost(0.0, 0.0)
    delta = delta or {}
    groups = min(depths, n)
    flops, nbytes = _maps_cost(layer_maps(geometry), delta, n, groups, element_bytes)
    heads, kv_heads, d = geometry["num_heads"], geometry["num_kv_heads"], geometry["head_dim"]
    flops += 4 * n * heads * d * context
    nbytes += element_bytes * (2 * geometry["hidden_size"] + 2 * n * kv_heads * d * context)
    return CallCost(float(flops), float(nbytes))


def fill_call_cost(
    geometry: dict[str, Any], n: int, element_bytes: int = 2, delta: dict[str, int] | None = None
) -> CallCost:
    """``n`` KV-fill rows (copy_state): the input norm and the k and v maps of a skipped position."""
    if n <= 0:
        return CallCost(0.0, 0.0)
    maps = {k: v for k, v in layer_maps(geometry).items() if k in ("k_proj", "v_proj")}
    flops, nbytes = _maps_cost(maps, delta or {}, n, 1, element_bytes)
    return CallCost(float(flops), float(nbytes + element_bytes * geometry["hidden_size"]))


def roofline_layer_tables(
    geometry: dict[str, Any],
    acc: Accelerator,
    context: int,
    sizes: list[int],
    num_loops: int,
    element_bytes: int = 2,
    lora_rank: int | None = None,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
) -> LatencyTables:
    """Latency tables of ONE layer (block, fill; ``block_mixed`` with a LoRA: items over all
    ``num_loops`` depths), the format ``recursive-serving-latency`` writes; embedding, head and
    emission cost nothing (the paper counts Transformer blocks only)."""
    sizes = sorted(set(sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"roofline sizes must be >= 1, got {sizes}")
    delta = lora_delta_parameters(layer_maps(geometry), lora_rank) if lora_rank else None

    def table(cost) -> LatencyTable:
        return LatencyTable(sizes, [cost(n).seconds(acc, launch_overhead_s) for n in sizes])

    zero = LatencyTable([1], [0.0])
    return LatencyTables(
        embed=zero,
        block=table(lambda n: layer_call_cost(geometry, n, context, element_bytes, delta, 1)),
        head=zero,
        fill=table(lambda n: fill_call_cost(geometry, n, element_bytes, delta)),
        block_mixed=table(lambda n: layer_call_cost(geometry, n, context, element_bytes, delta, num_loops))
        if delta
        else None,
        num_loops=num_loops,
        meta={
            "device": f"roofline estimate: {acc.name}",
            "clock": "roofline model",
            "context": context,
            "dtype_bytes": element_bytes,
            "launch_overhead_s": launch_overhead_s,
        },
    )


def roofline_table_file(
    geometry_name: str,
    acc_name: str,
    context: int,
    sizes: list[int],
    num_loops: int,
    lora_ranks: list[int],
    element_bytes: int = 2,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
) -> dict[str, Any]:
    """A latency-table file (as ``recursive-serving-latency`` writes) from the roofline model."""
    from lamda_repro.recursive.serving.latency import GEOMETRIES

    if geometry_name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry_name!r} (known: {', '.join(GEOMETRIES)})")
    geometry, acc = GEOMETRIES[geometry_name], accelerator(acc_name)
    tables = {
        "plain": roofline_layer_tables(
            geometry, acc, context, sizes, num_loops, element_bytes, None, launch_overhead_s
        )
    }
    for rank in lora_ranks:
        tables[f"lora_r{rank}"] = roofline_layer_tables(
            geometry, acc, context, sizes, num_loops, element_bytes, rank, launch_overhead_s
        )
    return {
        "geometry": geometry_name,
        "what": "roofline latency of ONE decoder layer of the geometry (block = layers per call x this)",
        "device": f"roofline estimate: {acc.name}",
        "accelerator": {"key": acc_name, **acc.to_dict()},
        "launch_overhead_s": launch_overhead_s,
        "context": context,
        "element_bytes": element_bytes,
        "tables": {name: t.to_dict() for name, t in tables.items()},
    }


__all__ = [
    "ACCELERATORS",
    "LAUNCH_OVERHEAD_S",
    "Accelerator",
    "CallCost",
    "accelerator",
    "layer_maps",
    "lora_delta_parameters",
    "layer_call_cost",
    "fill_call_cost",
    "roofline_layer_tables",
    "roofline_table_file",
]
