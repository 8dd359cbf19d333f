"""The early-exit and serving settings of the ``recursive:`` config section, resolved and checked.

    recursive:
      early_exit: {...}            defaults of early-exit post-training (early_exit.EarlyExitConfig)
      runs:
        - {name: rt-stepwise, ..., early_exit: true}    true, or overrides of the defaults
      serving:
        vanilla: tiny--full        run id of the vanilla (non-recursive) baseline
        runs: [tiny--rt-stepwise]  run ids served (recursive, with early_exit)
        threshold: 0.9             confidence threshold of the engine's early exit, in (0, 1]
        max_batch: 16              upper bound of the batch (>= 1)
        memory_budget_mb: 1.5      memory for weights + KV cache; the memory-bound batch follows
        workload: {num_requests, prompt_len, gen_len, arrival, rate, seed}
        repeats, latency: {repeats, warmup, sizes}, paper_estimate: {...}

Every check raises one line naming the key, before any job runs (the Snakefile and
``validate_config`` call ``resolve_serving``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lamda_repro.recursive.early_exit import (
    EarlyExitConfig,
    EarlyExitConfigError,
    check_threshold,
)
from lamda_repro.recursive.runner import RecursiveRunError, find_run, run_id
from lamda_repro.recursive.serving.scheduler import WorkloadError, make_workload

SERVING_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "threshold": 0.9,
    "max_batch": 16,
    "memory_budget_mb": None,
    "repeats": 3,
    "workload": {
        "num_requests": 32,
        "prompt_len": [8, 16],
        "gen_len": [8, 40],
        "arrival": "burst",
        "rate": None,
        "seed": 0,
    },
    "latency": {"repeats": 5, "warmup": 2, "sizes": None},
    "paper_estimate": None,
}
PAPER_ESTIMATE_DEFAULTS: dict[str, Any] = {
    "latency_tables": None,  # a file of measured tables (recursive-serving-latency), or none
    "roofline": [],  # accelerators of the roofline estimate (roofline.ACCELERATORS)
    "geometry": "gemma-2b",  # the roofline's geometry when no table file names one
    "num_loops": 2,
    "memory_budget_gb": 40.0,  # the paper's A100 40GB (Table K.2)
    "element_bytes": 2,  # bf16 weights and KV cache
    "workload": {"num_requests": 2000, "prompt_len": 512, "gen_len": 2048, "arrival": "burst", "seed": 0},
    "exit_distribution": None,  # None: the oracle distribution measured on the first served recursive run
    "lora_ranks": [],
}
REPO_ROOT = Path(__file__).resolve().parents[3]


class ServingConfigError(ValueError):
    """An invalid serving or early-exit setting; the message names the key."""


def _merge(defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in (given or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def early_exit_config(section: dict[str, Any], run: dict[str, Any]) -> EarlyExitConfig | None:
    """The run's early-exit settings (section defaults + the run's overrides), or None."""
    setting = run.get("early_exit", False)
    if setting is False:
        return None
    overrides = setting if isinstance(setting, dict) else {}
    where = f"recursive.runs.{run['name']}.early_exit"
    try:
        return EarlyExitConfig.from_dict({**(section.get("early_exit") or {}), **overrides})
    except EarlyExitConfigError as exc:
        raise ServingConfigError(f"{where}: {exc}") from None


def _check_early_exit_run(section: dict[str, Any], run: dict[str, Any]) -> None:
    where = f"recursive.runs.{run['name']}.early_exit"
    if run["variant"] != "recursive":
        raise ServingConfigError(f"{where}: early exit needs variant recursive, run is {run['variant']!r}")
    if run.get("num_loops", 1) < 2:
        raise ServingConfigError(f"{where}: early exit needs num_loops >= 2")
    if run.get("sharing", "cycle") != "cycle":
        raise ServingConfigError(f"{where}: early exit needs cycle sharing (a loop = a pass of the block)")
    early_exit_config(section, run)


def workload_from(settings: dict[str, Any], where: str):
    """The Workload of the ``workload:`` mapping under ``where``; errors name the key."""
    try:
        return make_workload(
            settings["num_requests"],
            settings["prompt_len"],
            settings["gen_len"],
            settings.get("arrival", "burst"),
            settings.get("rate"),
            settings.get("seed", 0),
        )
    except WorkloadError as exc:
        raise ServingConfigError(f"{where}.{exc}") from None


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ServingConfigError(f"{where}: must be an integer >= 1, got {value!r}")
    return value


def resolve_serving(section: dict[str, Any]) -> dict[str, Any] | None:
    """Check the early-exit runs and the ``serving`` block of a resolved recursive section.

    Returns the serving settings with defaults filled in (None when the section has none or it is
    disabled)."""
    for run in section.get("runs", []):
        if run.get("early_exit"):
            _check_early_exit_run(section, run)
    given = section.get("serving")
    if not given:
        return None
    cfg = _merge(SERVING_DEFAULTS, given)
    if not cfg["enabled"]:
        return None
    where = "recursive.serving"
    try:
        check_threshold(cfg["threshold"], f"{where}.threshold")
    except EarlyExitConfigError as exc:
        raise ServingConfigError(str(exc)) from None
    _positive_int(cfg["max_batch"], f"{where}.max_batch")
    _positive_int(cfg["repeats"], f"{where}.repeats")
    budget = cfg["memory_budget_mb"]
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0
    ):
        raise ServingConfigError(f"{where}.memory_budget_mb: must be > 0 or null, got {budget!r}")
    workload_from(cfg["workload"], where)
    runs = cfg.get("runs") or []
    if not runs:
        raise ServingConfigError(f"{where}.runs: needs at least one recursive run to serve")
    if "vanilla" not in given:
        raise ServingConfigError(f"{where}.vanilla: missing (the run id of the non-recursive baseline)")
    vanilla = _known_run(section, cfg["vanilla"], f"{where}.vanilla")
    if vanilla["variant"] != "original":
        raise ServingConfigError(
            f"{where}.vanilla: {cfg['vanilla']} is variant {vanilla['variant']!r}; "
            "the baseline must be variant original"
        )
    for i, rid in enumerate(runs):
        run = _known_run(section, rid, f"{where}.runs[{i}]")
        if run["variant"] != "recursive":
            raise ServingConfigError(
                f"{where}.runs[{i}]: {rid} is not a recursive model (variant {run['variant']!r})"
            )
        if not run.get("early_exit"):
            raise ServingConfigError(
                f"{where}.runs[{i}]: {rid} has no early_exit post-training (set early_exit)"
            )
        if run["model"] != vanilla["model"]:
            raise ServingConfigError(
                f"{where}.runs[{i}]: {rid} converts model {run['model']!r}, "
                f"the vanilla run is of {vanilla['model']!r}"
            )
    if len(set(runs)) != len(runs):
        raise ServingConfigError(f"{where}.runs: duplicate run ids")
    sizes = cfg["latency"].get("sizes")
    if sizes is not None:
        for i, n in enumerate(sizes):
            _positive_int(n, f"{where}.latency.sizes[{i}]")
    if cfg["paper_estimate"] is not None:
        cfg["paper_estimate"] = _resolve_paper(cfg["paper_estimate"], f"{where}.paper_estimate")
    return cfg


def _known_run(section: dict[str, Any], rid: Any, where: str) -> dict[str, Any]:
    if not isinstance(rid, str):
        raise ServingConfigError(f"{where}: a run id <model>--<name>, got {rid!r}")
    try:
        return find_run(section, rid)
    except RecursiveRunError:
        known = ", ".join(run_id(r) for r in section.get("runs", []))
        raise ServingConfigError(f"{where}: no recursive run {rid!r} (known: {known})") from None


def _resolve_paper(given: dict[str, Any], where: str) -> dict[str, Any]:
    cfg = _merge(PAPER_ESTIMATE_DEFAULTS, given)
    from lamda_repro.recursive.serving.latency import GEOMETRIES
    from lamda_repro.recursive.serving.roofline import ACCELERATORS

    if cfg.get("latency_tables") is not None and not cfg["latency_tables"]:
        raise ServingConfigError(f"{where}.latency_tables: empty (a latency-table file, or null)")
    if not cfg.get("latency_tables") and not cfg.get("roofline"):
        raise ServingConfigError(
            f"{where}: needs latency_tables (a latency-table file of the paper geometry) or roofline "
            "(accelerators)"
        )
    for i, name in enumerate(cfg.get("roofline") or []):
        if name not in ACCELERATORS:
            raise ServingConfigError(
                f"{where}.roofline[{i}]: unknown accelerator {name!r} (known: {', '.join(ACCELERATORS)})"
            )
    if cfg["geometry"] not in GEOMETRIES:
        raise ServingConfigError(
            f"{where}.geometry: unknown geometry {cfg['geometry']!r} (known: {', '.join(GEOMETRIES)})"
        )
    _positive_int(cfg["num_loops"], f"{where}.num_loops")
    workload_from(cfg["workload"], where)
    dist = cfg["exit_distribution"]
    if dist is not None:
        if len(dist) != cfg["num_loops"] or any(not isinstance(p, (int, float)) or p < 0 for p in dist):
            raise ServingConfigError(f"{where}.exit_distribution: {cfg['num_loops']} fractions >= 0")
        if abs(sum(dist) - 1) > 1e-6:
            raise ServingConfigError(f"{where}.exit_distribution: fractions must sum to 1, got {sum(dist)}")
    return cfg


def latency_table_path(path: str) -> Path:
    """A latency-table file named in the config: absolute, or relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def early_exit_dir(workdir: str | Path, rid: str) -> Path:
    """Where the early-exit post-trained model of run ``rid`` is saved (its record names it)."""
    return Path(workdir) / "recursive" / "early_exit" / rid


__all__ = [
    "SERVING_DEFAULTS",
    "PAPER_ESTIMATE_DEFAULTS",
    "ServingConfigError",
    "early_exit_config",
    "resolve_serving",
    "workload_from",
    "latency_table_path",
    "early_exit_dir",
]
