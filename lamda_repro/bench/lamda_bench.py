"""LaMDA memory / parameter-update benchmark on LLaMA-2-7B geometry (random weights).

Builds a LLaMA decoder with the 7B layer shapes (hidden 4096, MLP 11008, 32 heads) but only a
few decoder layers, one model per method (built, measured, freed), and measures side by side:
trainable parameters, parameter updates per optimizer step, bytes of parameters / gradients /
optimizer state / activations saved for backward, peak memory and step time. Every counted
quantity is split into outside the decoder layers, layer 0 and the later layers, so it
extrapolates exactly to 32 layers (later layers are all alike at fixed batch and sequence length).
"""

from __future__ import annotations

import gc
import json
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from lamda_repro.measure import PeakMemory

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "lora", "lora_fa", "lamda", "lamdapp")
# Claims from the abstract of Azizi et al. (EMNLP 2024 Findings, arXiv 2406.12832).
PAPER_CLAIMS = {
    "parameter_updates_reduction": {
        "value": 17.7,
        "text": "up to 17.7x fewer parameter updates",
        "source": "LaMDA paper, abstract",
    },
    "peak_memory_reduction": {
        "value": 1.32,
        "text": "up to 1.32x lower peak GPU memory usage",
        "source": "LaMDA paper, abstract",
    },
}


class BenchConfigError(ValueError):
    """A benchmark option is invalid."""


@dataclass
class BenchSettings:
    """What to build and measure (defaults: LLaMA-2-7B geometry, 2 layers, batch 1 x 512)."""

    layers: int = 2
    batch: int = 1
    seq: int = 512
    rank: int = 64
    alpha: float = 16.0
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    vocab: int = 32000
    full_layers: int = 32
    steps: int = 3
    warmup: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    run_steps: int = 1000  # T used for run-integrated parameter updates of the freeze schedule
    freeze_fraction: float = 0.3
    methods: tuple[str, ...] = METHODS
    device: str = "auto"
    threads: int = 0
    seed: int = 0

    def validate(self) -> None:
        for name in (
            "layers",
            "batch",
            "seq",
            "rank",
            "hidden",
            "intermediate",
            "heads",
            "vocab",
            "full_layers",
            "steps",
            "run_steps",
        ):
            if int(getattr(self, name)) < 1:
                raise BenchConfigError(f"bench option {name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise BenchConfigError(f"bench option warmup must be >= 0, got {self.warmup!r}")
        if self.hidden % self.heads:
            raise BenchConfigError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.rank > min(self.hidden, self.intermediate):
            raise BenchConfigError(f"rank {self.rank} exceeds the matrix sizes")
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise BenchConfigError(f"unknown bench methods {sorted(unknown)} (known: {', '.join(METHODS)})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BenchConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchConfigError("device cuda requested but CUDA is not available")


def _device(settings: BenchSettings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def build_llama(settings: BenchSettings, device: torch.device) -> nn.Module:
    """A LlamaForCausalLM with 7B layer shapes, ``settings.layers`` decoder layers, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        vocab_size=settings.vocab,
        max_position_embeddings=max(4096, settings.seq),
    )
    torch.manual_seed(settings.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model


# -- measurement helpers --------------------------------------------------------------------

# Every quantity is split three ways: outside the decoder layers, in layer 0 (whose input may not
# require grad, so it saves less), and in the later layers (all alike).
PARTS = ("outside", "layer0", "later_layers")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _part(name: str) -> str:
    match = _LAYER_INDEX.search(name)
    if match is None:
        return "outside"
    return "layer0" if match.group(1) == "0" else "later_layers"


def _empty() -> dict[str, int]:
    return {part: 0 for part in PARTS}


def _split_params(
    model: nn.Module, select: Callable[[nn.Parameter], bool], size: Callable[[nn.Parameter], int]
) -> dict[str, int]:
    out = _empty()
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not select(p):
            continue
        seen.add(id(p))
        out[_part(name)] += size(p)
    return out


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _optimizer_state_split(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = _empty()
    for p, state in optimizer.state.items():
        name = p if isinstance(p, str) else names.get(id(p), "")  # peft's LoRA-FA keys its state by name
        out[_part(name)] += sum(_bytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return out


def _frozen_elements(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> its elements a module declares frozen (LaMDA's frozen columns of B)."""
    out: dict[int, int] = {}
    for module in model.modules():
        for adapter, B in getattr(module, "lamda_B", {}).items():
            out[id(B)] = module.out_features * module.frozen_components(adapter)
    return out


def _trainable_elements(model: nn.Module) -> Callable[[nn.Parameter], int]:
    frozen = _frozen_elements(model)
    return lambda p: p.numel() - frozen.get(id(p), 0)


def _updated_split(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Elements the optimizer step updates: trainable parameters in the optimizer with a gradient,
    less LaMDA's frozen columns of B."""
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return _split_params(
        model,
        lambda p: id(p) in in_optimizer and p.requires_grad and p.grad is not None,
        _trainable_elements(model),
    )


def saved_activation_split(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, dict]:
    """Bytes of distinct non-parameter storages saved for backward, split like the parameters.

    A storage counts once, in the part where it is first saved.
    """
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, tuple[str, int]] = {}
    scope = ["outside"]
    layers = [
        m
        for n, mlist in model.named_modules()
        if n.endswith("layers") and isinstance(mlist, nn.ModuleList)
        for m in mlist
    ]

    def enter(module, *_):
        scope.append("layer0" if module is layers[0] else "later_layers")

    def leave(*_):
        scope.pop()

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(enter))
        handles.append(layer.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen[ptr] = (scope[-1], t.untyped_storage().nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
    finally:
        for h in handles:
            h.remove()
    split = _empty()
    for where, nbytes in seen.values():
        split[where] += nbytes
    return loss, split


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- methods --------------------------------------------------------------------------------


def _apply_method(kind: str, model: nn.Module, settings: BenchSettings):
    """(model, optimizer, info) for a method; LaMDA rows start with B fully trainable."""
    from peft import LoraConfig, get_peft_model

    targets = list(LLAMA_TARGETS)
    info: dict[str, Any] = {}
    if kind == "full":
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        return model, optimizer, info
    if kind in ("lora", "lora_fa"):
        model = get_peft_model(
            model,
            LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets, lora_dropout=0.0),
        )
        if kind == "lora_fa":
            from peft.optimizers import create_lorafa_optimizer

            optimizer = create_lorafa_optimizer(
                model,
                r=settings.rank,
                lora_alpha=settings.alpha,
                lr=settings.lr,
                weight_decay=settings.weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad],
                lr=settings.lr,
                weight_decay=settings.weight_decay,
            )
        return model, optimizer, info
    from lamda_repro.methods.lamda import LamdaConfig, allocate_ranks, weight_spectra
    from lamda_repro.methods.lamda.allocation import DEFAULT_RULE, rank_histogram

    rank_pattern = {}
    if kind == "lamdapp":
        t0 = time.perf_counter()
        # The default rule (energy_target) needs E(r) up to r_max = 4 r0: the top 4 r0 singular
        # values and the total energy, from a seeded randomized SVD.
        ranks = allocate_ranks(weight_spectra(model, targets, top_k=4 * settings.rank), settings.rank)
        info["spectra_seconds"] = round(time.perf_counter() - t0, 2)
        info["allocation_rule"] = DEFAULT_RULE
        info["rank_allocation"] = ranks
        info["rank_histogram"] = {str(k): v for k, v in rank_histogram(ranks).items()}
        rank_pattern = {re.escape(n): r for n, r in ranks.items()}
    config = LamdaConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=targets,
        init="svd_lowrank",
        freeze_fraction=settings.freeze_fraction,
        total_steps=settings.run_steps,
        rank_pattern=rank_pattern,
    )
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay
    )
    return model, optimizer, info


def _freeze_all(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from lamda_repro.methods.lamda import LamdaLayer

    for module in model.modules():
        if isinstance(module, LamdaLayer):
            for adapter in module.lamda_S:
                module.freeze_components(adapter, module.r[adapter], optimizer)
                module.release_b(adapter, optimizer)  # one process: B leaves training


def lamda_run_updates(model: nn.Module, run_steps: int, freeze_fraction: float) -> dict[str, int]:
    """Parameter updates of the LaMDA path summed over a run of ``run_steps`` steps (freeze schedule)."""
    from lamda_repro.methods.lamda import LamdaLayer, frozen_count_at_step

    out = _empty()
    for name, module in model.named_modules():
        if not isinstance(module, LamdaLayer):
            continue
        for adapter in module.lamda_S:
            r, d_out = module.r[adapter], module.out_features
            # frozen_count_at_step is a step function; sum it over all steps exactly.
            total = sum(
                r * r + d_out * (r - frozen_count_at_step(s, r, freeze_fraction, run_steps))
                for s in range(run_steps)
            )
            out[_part(name + ".")] += total
    return out


def _measure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: BenchSettings,
    device: torch.device,
    inputs: torch.Tensor,
) -> dict[str, Any]:
    model.train()

    def step(record: Optional[dict] = None) -> None:
        if record is not None:
            loss, record["saved"] = saved_activation_split(model, lambda: model(inputs, labels=inputs).loss)
        else:
            loss = model(inputs, labels=inputs).loss
        loss.backward()
        if record is not None:
            record["grads"] = _split_params(model, lambda p: p.grad is not None, lambda p: _bytes(p.grad))
            record["updated"] = _updated_split(model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    record: dict[str, Any] = {}
    step(record)  # also the first warm-up step: allocates the optimizer state
    for _ in range(max(0, settings.warmup - 1)):
        step()
    times = []
    with PeakMemory(device) as peak:
        for _ in range(settings.steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return {
        "trainable": _split_params(model, lambda p: p.requires_grad, _trainable_elements(model)),
        "updates_per_step": record["updated"],
        "param_bytes": _split_params(model, lambda p: True, _bytes),
        "grad_bytes": record["grads"],
        "optimizer_state_bytes": _optimizer_state_split(model, optimizer),
        "saved_activation_bytes": record["saved"],
        "peak": peak.result(),
        "step_seconds": statistics.median(times),
        "step_seconds_all": [round(t, 4) for t in times],
    }


SPLIT_KEYS = (
    "trainable",
    "updates_per_step",
    "param_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "saved_activation_bytes",
)


def _totals(row: dict[str, Any], layers: int, target_layers: int) -> dict[str, Any]:
    """Totals at the measured depth and extrapolated to ``target_layers`` decoder layers."""
    measured, extrapolated = {}, {}
    for key in SPLIT_KEYS + ("run_updates",):
        if key not in row:
            continue
        split = row[key]
        measured[key] = sum(split.values())
        if layers == 1:
            extrapolated[key] = split["outside"] + split["layer0"] * target_layers
        else:
            per_layer = split["later_layers"] / (layers - 1)
            extrapolated[key] = round(split["outside"] + split["layer0"] + per_layer * (target_layers - 1))
    for out in (measured, extrapolated):
        out["modelled_peak_bytes"] = sum(
            out[k] for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "saved_activation_bytes")
        )
    return {"measured": measured, "extrapolated": extrapolated}


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, measure and free one model per method; returns the benchmark record."""
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = _device(settings)
    g = torch.Generator().manual_seed(settings.seed + 1)
    inputs = torch.randint(0, settings.vocab, (settings.batch, settings.seq), generator=g).to(device)
    rows: dict[str, dict[str, Any]] = {}
    for kind in settings.methods:
        t0 = time.perf_counter()
        model = build_llama(settings, device)
        model, optimizer, info = _apply_method(kind, model, settings)
        setup = time.perf_counter() - t0
        if kind in ("lamda", "lamdapp"):
            if kind == "lamda":
                row = _measure(model, optimizer, settings, device, inputs)
                row.update(
                    info=dict(info, state="B trainable (before any component is frozen)"),
                    setup_seconds=round(setup, 2),
                )
                rows["lamda_b_trainable"] = row
                log(f"measured lamda_b_trainable: step {row['step_seconds']:.2f}s")
            run_updates = lamda_run_updates(model, settings.run_steps, settings.freeze_fraction)
            _freeze_all(model, optimizer)
            row = _measure(model, optimizer, settings, device, inputs)
            row["run_updates"] = run_updates
            row.update(info=dict(info, state="B fully frozen (only S trains)"), setup_seconds=round(setup, 2))
            name = "lamda_b_frozen" if kind == "lamda" else "lamdapp_b_frozen"
        else:
            row = _measure(model, optimizer, settings, device, inputs)
            row["run_updates"] = {k: v * settings.run_steps for k, v in row["updates_per_step"].items()}
            row.update(info=info, setup_seconds=round(setup, 2))
            name = kind
        rows[name] = row
        log(f"measured {name}: step {row['step_seconds']:.2f}s, setup {setup:.1f}s")
        large = sum(p.numel() for p in model.parameters()) > 50_000_000
        del model, optimizer, row
        if large:  # free the weights before the next model is built (a full collection costs ~1 s)
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows.values():
        row["totals"] = _totals(row, settings.layers, settings.full_layers)
    return {
        "benchmark": "lamda_memory_updates",
        "settings": {**asdict(settings), "methods": list(settings.methods)},
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "versions": _versions(),
        "rows": rows,
        "ratios_vs_lora": _ratios(rows),
        "paper_claims": PAPER_CLAIMS,
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def _ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """LoRA's value divided by each method's (> 1: the method needs less), measured and at full depth."""
    if "lora" not in rows:
        return {}
    out = {}
    for name, row in rows.items():
        ratios = {}
        for depth in ("measured", "extrapolated"):
            base, mine = rows["lora"]["totals"][depth], row["totals"][depth]
            for key in (
                "trainable",
                "updates_per_step",
                "run_updates",
                "optimizer_state_bytes",
                "saved_activation_bytes",
                "modelled_peak_bytes",
            ):
                if key in base and key in mine and mine[key]:
                    ratios[f"{depth}.{key}"] = round(base[key] / mine[key], 3)
        if rows["lora"]["peak"].get("peak_bytes") and row["peak"].get("peak_bytes"):
            ratios["measured.peak_bytes"] = round(
                rows["lora"]["peak"]["peak_bytes"] / row["peak"]["peak_bytes"], 3
            )
        ratios["measured.step_seconds"] = round(rows["lora"]["step_seconds"] / row["step_seconds"], 3)
        out[name] = ratios
    return out


def _count(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n:,}"


def _mb(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def to_markdown(record: dict[str, Any]) -> str:
    """The benchmark record as Markdown tables (measured depth, then extrapolated to full depth)."""
    s = record["settings"]
    rows, ratios = record["rows"], record["ratios_vs_lora"]
    seven_b = (s["hidden"], s["intermediate"], s["heads"]) == (4096, 11008, 32)
    geometry = (
        "LLaMA-2-7B geometry"
        if seven_b
        else f"LLaMA geometry (hidden {s['hidden']}, MLP {s['intermediate']}, {s['heads']} heads)"
    )
    lines = [
        f"# LaMDA benchmark: {geometry}, {s['layers']} decoder layers, batch {s['batch']} x seq {s['seq']}",
        "",
        f"Device: {record['device']['type']} ({record['device']['name']}, "
        f"{record['device']['threads']} threads); rank {s['rank']}, alpha {s['alpha']}, "
        "targets q,k,v,o,gate,up,down; fp32; AdamW; "
        f"step time = median of {s['steps']} steps after {s['warmup']} warm-up step(s). "
        "Random weights (LaMDA init: randomized SVD).",
        "",
        f"## Measured ({s['layers']} layers)",
        "",
        "| method | trainable | updates/step | params MiB | grads MiB | optimizer MiB | "
        "saved activations MiB | peak MiB | step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        m = row["totals"]["measured"]
        lines.append(
            f"| {name} | {m['trainable']:,} | {m['updates_per_step']:,} | {_mb(m['param_bytes'])} | "
            f"{_mb(m['grad_bytes'])} | {_mb(m['optimizer_state_bytes'])} | "
            f"{_mb(m['saved_activation_bytes'])} | {_mb(row['peak'].get('peak_bytes'))} | "
            f"{row['step_seconds']:.3f} |"
        )
    peak_kind = next(iter(rows.values()))["peak"].get("peak_kind", "")
    peak_note = (
        "process resident-set high-water mark, includes all weights and the interpreter"
        if peak_kind == "cpu_rss"
        else "max allocated minus the allocation at start"
    )
    lines += ["", f"Peak = {peak_kind} ({peak_note}).", ""]
    lines += [
        f"## Extrapolated to {s['full_layers']} layers, ratios LoRA / method (> 1: method needs less)",
        "",
        f"Run-integrated updates: sum over T = {s['run_steps']} optimizer steps of the elements updated, "
        f"with B frozen column by column over the first {s['freeze_fraction']} of T. "
        "Modelled peak = parameters + gradients + optimizer state + saved activations.",
        "",
        "| method | trainable | updates/step | run updates | modelled peak GiB | ratio updates/step | "
        "ratio run updates | ratio modelled peak | ratio saved activations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        e, r = row["totals"]["extrapolated"], ratios.get(name, {})
        lines.append(
            f"| {name} | {e['trainable']:,} | {e['updates_per_step']:,} | {_count(e.get('run_updates'))} | "
            f"{e['modelled_peak_bytes'] / 2**30:,.2f} | {r.get('extrapolated.updates_per_step', 'n/a')} | "
            f"{r.get('extrapolated.run_updates', 'n/a')} | "
            f"{r.get('extrapolated.modelled_peak_bytes', 'n/a')} | "
            f"{r.get('extrapolated.saved_activation_bytes', 'n/a')} |"
        )
    claims = record["paper_claims"]
    lines += [
        "",
        "Paper claims ("
        + claims["parameter_updates_reduction"]["source"]
        + "): "
        + "; ".join(f'"{c["text"]}"' for c in claims.values())
        + ". The paper's exact definitions, models and batch settings are not known here; the rows above "
        "are this benchmark's definitions.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(record: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``<out>.json`` and ``<out>.md`` atomically (``out`` may end in .json or .md)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = (stem.with_suffix(".json"), stem.with_suffix(".md"))
    for path, text in zip(
        paths, (json.dumps(record, indent=2, default=_json_default) + "\n", to_markdown(record)), strict=True
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
