"""How well each relaxation approximates the original weights, before any training.

For a stack of L layers tied into K = L / B shared layers (sharing and init as in convert.py),
every relaxation kind and budget gives relaxed weights W'_shared + delta_l at each position; the
table reports the relative Frobenius error sqrt(sum ||W_l - W_hat_l||^2) / sqrt(sum ||W_l||^2)
over all relaxed maps and positions (the recursive model without relaxation is the row with no
budget). Budgets are given as LoRA ranks (the parameters lora adds at that rank), so the rows of
one budget compare equal parameter counts, not equal ranks.

Pure linear algebra on the weights (spectral.py's factors, the same as the relaxation's SVD
init): no model is run, so it also works on encoders whose layers the converter does not handle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lamda_repro.recursive import spectral
from lamda_repro.recursive.relax import linear_map_names, map_shapes, weight_out_in
from lamda_repro.recursive.spec import RecursionSpec, check_recursion

# Layer lists of base models and LM heads (decoders as in spec.py, plus BERT-style encoders).
LAYER_LIST_PATHS = (
    "model.layers",
    "layers",
    "gpt_neox.layers",
    "transformer.h",
    "h",
    "encoder.layer",
    "bert.encoder.layer",
)


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a decoder or an encoder (first match of LAYER_LIST_PATHS)."""
    for path in LAYER_LIST_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(f"no layer list at {', '.join(LAYER_LIST_PATHS)} in {type(model).__name__}")


def layer_weights(layers: nn.ModuleList) -> dict[str, list[torch.Tensor]]:
    """{map name: [W_0 .. W_{L-1}]} as float32 (d_out, d_in) matrices, detached."""
    names = linear_map_names(layers[0])
    return {
        name: [weight_out_in(layer.get_submodule(name)).detach().float().cpu() for layer in layers]
        for name in names
    }


def shared_weights(weights: list[torch.Tensor], spec: RecursionSpec) -> list[torch.Tensor]:
    """W'_shared of each shared layer from the originals (stepwise / average / lower / upper)."""
    if spec.init == "random":
        raise ValueError("random init has no weight-space counterpart here")
    return [torch.stack([weights[s] for s in spec.source_layers(k)]).mean(0) for k in range(spec.num_shared)]


def _decompositions(kind, weights, shared, spec, maps, cache):
    """{unit key: (Decomposition, originals, shared weight)} of one relaxation kind (lora and
    lamda_depth approximate with the same per-position SVD: computed once, kept in ``cache``)."""
    family = "shared_basis" if kind == "shared_basis" else "per_position"
    if family in cache:
        return cache[family]
    out = {}
    for unit in spectral.units_of(kind, maps, spec.num_layers, spec.num_loops):
        index, name = unit.key.split("/", 1)
        positions = spec.positions_of(int(index)) if kind == "shared_basis" else [int(index)]
        base = shared[name][spec.shared_index(positions[0])]
        originals = [weights[name][p] for p in positions]
        caps = spectral.rank_caps(kind, unit.d_in, unit.d_out, unit.num_depths)
        out[unit.key] = (spectral.Decomposition(kind, [w - base for w in originals], caps), originals, base)
    cache[family] = out
    return out


def relaxation_error_rows(
    layers: nn.ModuleList,
    num_loops: int,
    budget_ranks: list[int],
    init: str = "average",
    sharing: str = "cycle",
    kinds: tuple[str, ...] = spectral.RELAXATIONS,
    allocations: tuple[str, ...] = spectral.ALLOCATIONS,
) -> list[dict[str, Any]]:
    """One row per (kind, budget, allocation) plus the unrelaxed recursive row: parameters the
    relaxation adds, its ranks and the relative Frobenius error of the relaxed weights."""
    num_layers = len(layers)
    check_recursion(num_layers, num_loops, sharing, init)
    spec = RecursionSpec(num_layers=num_layers, num_loops=num_loops, sharing=sharing, init=init)
    maps = map_shapes(layers[0])
    with torch.no_grad():
        weights = layer_weights(layers)
        shared = {name: shared_weights(ws, spec) for name, ws in weights.items()}
        originals = [w for ws in weights.values() for w in ws]
        tied = [shared[name][spec.shared_index(p)] for name in weights for p in range(num_layers)]
        common = {"layers": num_layers, "loops": num_loops, "init": init, "sharing": sharing}
        rows = [
            {
                **common,
                "relaxation": "none (recursive)",
                "allocation": "",
                "budget_lora_rank": None,
                "parameters": 0,
                "ranks": "",
                "relative_error": spectral.relative_error(originals, tied),
            }
        ]
        cache: dict[str, Any] = {}
        for kind in kinds:
            decompositions = _decompositions(kind, weights, shared, spec, maps, cache)
            units = spectral.units_of(kind, maps, num_layers, num_loops)
            lora_units = spectral.units_of("lora", maps, num_layers, num_loops)
            for budget_rank in budget_ranks:
                budget = spectral.total_cost(
                    "lora", lora_units, spectral.uniform_ranks("lora", lora_units, budget_rank)
                )
                for allocation in allocations:
                    if allocation == "uniform":
                        level = spectral.budget_level(kind, units, budget)
                        ranks = spectral.uniform_ranks(kind, units, level)
                    else:
                        gains = {k: d.energy_curve() for k, (d, _, _) in decompositions.items()}
                        ranks = spectral.allocate_spectral(kind, units, budget, gains)
                    approx, exact = [], []
                    for key, (decomposition, ws, base) in decompositions.items():
                        deltas = decomposition.approximations(*ranks[key])
                        approx += [base.double() + d for d in deltas]
                        exact += ws
                    rows.append(
                        {
                            **common,
                            "relaxation": kind,
                            "allocation": allocation,
                            "budget_lora_rank": budget_rank,
                            "parameters": spectral.total_cost(kind, units, ranks),
                            "ranks": _rank_range(ranks),
                            "relative_error": spectral.relative_error(exact, approx),
                        }
                    )
    return rows


def _rank_range(ranks: dict[str, tuple[int, int]]) -> str:
    outs = sorted({r[0] for r in ranks.values()})
    ins = sorted({r[1] for r in ranks.values()})
    text = str(outs[0]) if len(outs) == 1 else f"{outs[0]}-{outs[-1]}"
    if ins != outs:
        text += " x " + (str(ins[0]) if len(ins) == 1 else f"{ins[0]}-{ins[-1]}")
    return text


def error_table_markdown(rows: list[dict[str, Any]], label: str) -> str:
    """The rows as a Markdown table (relative error in percent, 2 decimals)."""
    import pandas as pd

    from lamda_repro.tables import to_markdown

    table = pd.DataFrame(
        {
            "Model": [label] * len(rows),
            "B": [r["loops"] for r in rows],
            "Init": [r["init"] for r in rows],
            "Relaxation": [r["relaxation"] for r in rows],
            "Allocation": [r["allocation"] for r in rows],
            "Budget (= lora r)": [
                "-" if r["budget_lora_rank"] is None else str(r["budget_lora_rank"]) for r in rows
            ],
            "Params added": [f"{r['parameters']:,}" for r in rows],
            "Ranks": [r["ranks"] for r in rows],
            "Rel. error (%)": [f"{100 * r['relative_error']:.2f}" for r in rows],
        }
    )
    return to_markdown(table)


__all__ = [
    "find_layers",
    "layer_weights",
    "shared_weights",
    "relaxation_error_rows",
    "error_table_markdown",
]
