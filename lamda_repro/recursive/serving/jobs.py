"""The two jobs of early exit and serving, each ending in one run record.

``execute_early_exit``  (kind "early_exit", one per run with ``early_exit``): load the uptrained
    run model (the path its recursive record names), post-train it with the early-exit loss,
    measure the exit sweep on held-out text (perplexity, exit-loop distribution and lm-eval
    accuracy for the final loop, the oracle rule and every confidence threshold) and save it.
``execute_serving``  (kind "serving", one per config): the benchmark. For the vanilla run and
    every served run: memory-bound batch, latency tables, the real engine on the workload with
    every scheduler (with and without early exit; repeated, interleaved, median), the simulator
    on the same inputs (prediction error), the simulated threshold sweep, and the paper-scale
    estimates: on the configured latency-table file, and on the roofline model of each configured
    accelerator (roofline.py).
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lamda_repro.recursive import parallel, runner
from lamda_repro.recursive.counts import model_non_embedding_parameters, weight_bytes
from lamda_repro.recursive.early_exit import loop_spec, mean_loops, train_early_exit
from lamda_repro.recursive.serving.config import (
    early_exit_config,
    early_exit_dir,
    latency_table_path,
    resolve_serving,
    workload_from,
)

SERVING_RUN_ID = "serving"
STEPS_PER_TURN = 8  # interleaved benchmark: steps a run takes before the next run's turn


class ServingRunError(RuntimeError):
    """A job's input (a record, a model folder, the corpus) is missing or unusable."""


def _read_record(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServingRunError(f"{what}: cannot read {path} ({type(exc).__name__})") from None
    if record.get("status") != "success":
        raise ServingRunError(f"{what}: {path} records a failed run ({record.get('error')})")
    return record


def _model_dir(record: dict[str, Any], what: str) -> Path:
    folder = (record.get("artifacts") or {}).get("model_dir")
    if not folder or not (Path(folder) / "model.safetensors").is_file():
        raise ServingRunError(
            f"{what}: the record names no saved model (or it is gone: {folder}); rerun that job"
        )
    return Path(folder)


def _load_saved(folder: Path, device: torch.device):
    from transformers import AutoTokenizer

    from lamda_repro.recursive.convert import load_recursive

    model = load_recursive(folder).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _finish(record: dict[str, Any], start: float, fill) -> dict[str, Any]:
    from lamda_repro.results import utc_now

    try:
        fill()
        record["status"] = "success"
    except Exception as exc:  # the record must say why a job failed
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=8)
    record["wall_time_s"] = time.perf_counter() - start
    record["finished_at"] = utc_now()
    return record


# -- early exit ------------------------------------------------------------------------------


def execute_early_exit(
    section: dict[str, Any], rid: str, workdir: str | Path, source_record: str | Path, device: str = "auto"
) -> dict[str, Any]:
    """Early-exit post-training and the exit sweep of run ``rid``; returns its record."""
    from lamda_repro.recursive.serving.quality import exit_quality, lm_eval_scores
    from lamda_repro.results import new_record

    run = runner.find_run(section, rid)
    cfg = early_exit_config(section, run)
    if cfg is None:
        raise ServingRunError(f"recursive.runs.{run['name']}: no early_exit settings")
    spec = {
        "run": run,
        "model": section["models"][run["model"]],
        "early_exit": cfg.to_dict(),
        "eval": section["eval"],
        "corpus": section["corpus"],
        "seed": section["seed"],
    }
    record = new_record(rid, "early_exit", spec)
    workdir = Path(workdir)

    def fill():
        dev = runner.pick_device(device)
        source = _model_dir(_read_record(source_record, f"run {rid}"), f"run {rid}")
        model, tokenizer = _load_saved(source, dev)
        spec_ = loop_spec(model)
        record["params"] = {
            "non_embedding": model_non_embedding_parameters(model),
            "weight_bytes": weight_bytes(model),
        }
        record["method_info"] = {"recursion": spec_.to_dict(), "source_model_dir": str(source)}
        batches = runner.train_batches(section, workdir, tokenizer, cfg.seq_len, cfg.batch_size)
        record["train"] = train_early_exit(
            model, batches, cfg, seed=section["seed"], desc=f"early exit {rid}"
        )
        if not parallel.is_main_process():
            return  # rank 0 alone sweeps, evaluates and saves
        settings = [("none", None), ("oracle", None), *[("confidence", t) for t in cfg.thresholds]]
        sweep = []
        for rule, threshold in settings:
            held_out = runner.train_batches(
                section, workdir, tokenizer, cfg.eval_seq_len, cfg.eval_batch_size, "validation"
            )
            sweep.append(exit_quality(model, held_out, rule, threshold, cfg.kv_policy, cfg.eval_batches))
        ev = section["eval"]
        include = str(runner.corpus_dir(workdir) / "tasks") if section["corpus"]["kind"] == "smoke" else None
        scores = lm_eval_scores(
            model,
            tokenizer,
            ev["tasks"],
            settings,
            include_path=include,
            num_fewshot=ev["num_fewshot"],
            limit=cfg.eval_limit if cfg.eval_limit is not None else ev["limit"],
            batch_size=ev["batch_size"],
            metrics=ev["metrics"],
            seed=section["seed"],
            kv_policy=cfg.kv_policy,
        )
        for point, acc in zip(sweep, scores, strict=True):
            point["accuracy"] = acc
            point["average"] = sum(acc.values()) / len(acc)
        record["sweep"] = sweep
        final, oracle = sweep[0], sweep[1]
        record["metrics"] = {
            "average": final["average"],
            "perplexity": final["perplexity"],
            "oracle_mean_loops": oracle["mean_loops"],
            "oracle_average": oracle["average"],
            "oracle_perplexity": oracle["perplexity"],
        }
        record["primary_metric"] = "average"
        out = runner.save_recursive(model, early_exit_dir(workdir, rid), tokenizer)
        record["artifacts"] = {"model_dir": str(out)}

    return _finish(record, time.perf_counter(), fill)


# -- serving ---------------------------------------------------------------------------------


def held_out_prompts(section, workdir, tokenizer, lengths: list[int]) -> list[list[int]]:
    """One prompt per request: the first ``lengths[i]`` tokens of held-out sequence i (packed
    validation text; the split is reread when the workload has more requests than it has rows)."""
    longest = max(lengths)
    prompts: list[list[int]] = []
    while len(prompts) < len(lengths):
        rows = runner.train_batches(section, workdir, tokenizer, longest, 1, "validation")
        before = len(prompts)
        for row in rows:
            prompts.append(row[0, : lengths[len(prompts)]].tolist())
            if len(prompts) == len(lengths):
                break
        if len(prompts) == before:
            raise ServingRunError(f"the held-out corpus has no sequence of {longest} tokens for the prompts")
    return prompts


def max_batch_for(model, cfg: dict[str, Any], workload, device: torch.device) -> dict[str, Any]:
    """The memory-bound batch of ``model`` and what it came from."""
    from lamda_repro.recursive.serving.engine import model_geometry
    from lamda_repro.recursive.serving.simulator import memory_bound_batch

    element = next(model.parameters()).element_size()
    kv = model_geometry(model).kv_bytes_per_token(element) * workload.max_context
    weights = weight_bytes(model)
    budget_mb = cfg["memory_budget_mb"]
    source = "config memory_budget_mb"
    if budget_mb is None and device.type == "cuda":
        budget_mb, source = torch.cuda.mem_get_info(device)[0] * 0.9 / 2**20, "90% of free CUDA memory"
    if budget_mb is None:
        return {
            "max_batch": cfg["max_batch"],
            "source": "max_batch (no memory budget)",
            "weight_bytes": weights,
            "kv_bytes_per_sequence": kv,
        }
    batch = memory_bound_batch(budget_mb * 2**20, weights, kv, cap=cfg["max_batch"])
    return {
        "max_batch": batch,
        "source": f"min(max_batch, floor((budget - weights) / KV per sequence)), budget from {source}",
        "memory_budget_mb": budget_mb,
        "weight_bytes": weights,
        "kv_bytes_per_sequence": kv,
    }


def _combos(loops: int) -> list[tuple[str, bool]]:
    if loops == 1:  # one loop: depth-wise batching is sequence-wise batching, and there is no exit
        return [("static", False), ("csb", False)]
    return [(s, e) for e in (False, True) for s in ("static", "csb", "cdb")]


def execute_serving(
    section: dict[str, Any],
    workdir: str | Path,
    early_exit_records: dict[str, str],
    vanilla_record: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """The serving benchmark of the config's ``serving`` block; returns its record."""
    from lamda_repro.results import new_record

    cfg = resolve_serving(section)
    if cfg is None:
        raise ServingRunError("recursive.serving: not configured (or disabled)")
    spec = {
        "serving": cfg,
        "vanilla": runner.find_run(section, cfg["vanilla"]),
        "runs": {rid: runner.find_run(section, rid) for rid in cfg["runs"]},
        "model": section["models"][runner.find_run(section, cfg["vanilla"])["model"]],
        "corpus": section["corpus"],
        "seed": section["seed"],
    }
    record = new_record(SERVING_RUN_ID, "serving", spec)
    record["spec"]["scale"] = "smoke" if section["corpus"]["kind"] == "smoke" else "paper"

    def fill():
        _fill_serving(record, section, cfg, Path(workdir), early_exit_records, vanilla_record, device)

    return _finish(record, time.perf_counter(), fill)


def _load_vanilla(section, cfg, workdir, vanilla_record, device):
    run = runner.find_run(section, cfg["vanilla"])
    if runner.uptrain_config(section, run) is None:
        return runner.load_base(section, run["model"], workdir, device)
    if vanilla_record is None:
        raise ServingRunError(f"{cfg['vanilla']} is uptrained: its record (with save_model) is needed")
    return _load_saved(_model_dir(_read_record(vanilla_record, cfg["vanilla"]), cfg["vanilla"]), device)


def _fill_serving(record, section, cfg, workdir, ee_paths, vanilla_record, device) -> None:
    from lamda_repro.recursive.serving.backend import EngineBackend
    from lamda_repro.recursive.serving.engine import model_geometry
    from lamda_repro.recursive.serving.latency import TableSampler, default_sizes
    from lamda_repro.recursive.serving.scheduler import Schedule
    from lamda_repro.recursive.serving.simulator import prediction_error, simulate

    dev = runner.pick_device(device)
    seed = section["seed"]
    vanilla, tokenizer = _load_vanilla(section, cfg, workdir, vanilla_record, dev)
    models = {
        cfg["vanilla"]: {
            "model": vanilla,
            "kind": "vanilla",
            "early_exit_record": None,
            "kv_policy": "copy_state",
        }
    }
    for rid in cfg["runs"]:
        if rid not in ee_paths:
            raise ServingRunError(f"no early-exit record given for {rid}")
        ee = _read_record(ee_paths[rid], f"early exit of {rid}")
        model, _ = _load_saved(_model_dir(ee, f"early exit of {rid}"), dev)
        kind = "relaxed" if (getattr(model.config, "recursion", None) or {}).get("lora") else "recursive"
        kv_policy = ((ee.get("spec") or {}).get("early_exit") or {}).get("kv_policy", "copy_state")
        models[rid] = {"model": model, "kind": kind, "early_exit_record": ee, "kv_policy": kv_policy}
    workload = workload_from(cfg["workload"], "recursive.serving")
    prompts = held_out_prompts(section, workdir, tokenizer, list(workload.prompt_lens))
    context = max(1, round(workload.mean_context))
    lat = cfg["latency"]
    phases = {"load": time.perf_counter()}
    info: dict[str, dict[str, Any]] = {}
    for rid, entry in models.items():
        model = entry["model"]
        memory = max_batch_for(model, cfg, workload, dev)
        info[rid] = {
            "kind": entry["kind"],
            "num_loops": model_geometry(model).num_loops,
            "non_embedding": model_non_embedding_parameters(model),
            "kv_policy": entry["kv_policy"],
            **memory,
            "_sizes": lat["sizes"] or default_sizes(memory["max_batch"]),
        }
    # The real engine on every (model, scheduler, exit) combination, all runs interleaved step by
    # step (each run's clock counts its own steps only) with the sampling of every model's
    # latency tables, so that the runs and the tables that predict them share the machine's load.
    combos = [(rid, s, e) for rid in models for s, e in _combos(info[rid]["num_loops"])]
    measured: dict[tuple, list[float]] = {c: [] for c in combos}
    details: dict[tuple, dict[str, Any]] = {}
    samplers = {
        rid: TableSampler(entry["model"], context, info[rid]["_sizes"], entry["kv_policy"], seed)
        for rid, entry in models.items()
    }
    for sampler in samplers.values():
        sampler.warmup(lat["warmup"])
    for _ in range(cfg["repeats"]):
        runs = []
        for combo in combos:
            rid, scheduler, early_exit = combo
            threshold = cfg["threshold"] if early_exit else None
            backend = EngineBackend(
                models[rid]["model"], prompts, info[rid]["max_batch"], workload.max_context, threshold,
                models[rid]["kv_policy"],
            )  # fmt: skip
            backend.pause()
            runs.append(
                (combo, backend, Schedule(scheduler, workload, backend, info[rid]["max_batch"], early_exit))
            )
        active = list(runs)
        while active:  # turns of STEPS_PER_TURN steps: long enough to run on warm caches
            for run in list(active):
                _, backend, schedule = run
                backend.resume()
                more = all(schedule.advance() for _ in range(STEPS_PER_TURN))
                backend.pause()
                if not more:
                    active.remove(run)
            for sampler in samplers.values():
                for _ in range(STEPS_PER_TURN):
                    sampler.sample()
        for combo, backend, schedule in runs:
            measured[combo].append(schedule.result.tokens_per_s)
            if combo not in details:
                timings = {"prefill_s": backend.prefill_s, **{f"{k}_s": v for k, v in backend.call_s.items()}}
                timings["bookkeeping_s"] = schedule.result.decode_time_s - sum(backend.call_s.values())
                timings["clock"] = backend.clock_name
                details[combo] = {
                    "summary": schedule.result.summary(),
                    "timings": timings,
                    "generated": backend.generated,
                }
    for rid, sampler in samplers.items():
        sampler.sweep(lat["repeats"])  # more samples of every cell, after the runs
        info[rid]["_tables"] = sampler.tables()
        info[rid]["latency_tables"] = info[rid]["_tables"].to_dict()
        del info[rid]["_sizes"]
    phases["engine"] = time.perf_counter()
    rows = []
    for combo in combos:
        rid, scheduler, early_exit = combo
        summary = details[combo]["summary"]
        tables = info[rid]["_tables"]
        observed = summary["exit_distribution"] if early_exit else None
        held_out = (
            _held_out_distribution(models[rid]["early_exit_record"], cfg["threshold"]) if early_exit else None
        )
        sim_held = (
            simulate(scheduler, workload, tables, info[rid]["max_batch"], held_out, seed).tokens_per_s
            if held_out
            else None
        )
        tokens_per_s = statistics.median(measured[combo])
        sim = simulate(scheduler, workload, tables, info[rid]["max_batch"], observed, seed)
        rows.append(
            {
                "model": rid,
                "kind": info[rid]["kind"],
                "scheduler": scheduler,
                "early_exit": early_exit,
                "threshold": cfg["threshold"] if early_exit else None,
                "max_batch": info[rid]["max_batch"],
                "measured_tokens_per_s": tokens_per_s,
                "measured_repeats": measured[combo],
                "simulated_tokens_per_s": sim.tokens_per_s,
                "prediction_error": prediction_error(sim.tokens_per_s, tokens_per_s),
                "simulated_heldout_tokens_per_s": sim_held,
                "observed_exit_distribution": observed,
                "heldout_exit_distribution": held_out,
                "steps": summary["steps"],
                "block_calls": summary["block_calls"],
                "mean_call_size": summary["mean_call_size"],
                "max_call_size": summary["max_call_size"],
                "timings_s": details[combo]["timings"],
                "quality": _quality(
                    models[rid]["early_exit_record"], cfg["threshold"] if early_exit else None
                ),
            }
        )
    base = next(r for r in rows if r["kind"] == "vanilla" and r["scheduler"] == "static")
    for row in rows:
        row["measured_vs_vanilla_static"] = row["measured_tokens_per_s"] / base["measured_tokens_per_s"]
        row["simulated_vs_vanilla_static"] = row["simulated_tokens_per_s"] / base["simulated_tokens_per_s"]
    record["results"] = rows
    record["greedy_outputs_match"] = _outputs_match(details, models)
    record["models"] = {
        rid: {k: v for k, v in entry.items() if k != "_tables"} for rid, entry in info.items()
    }
    record["workload"] = {
        "num_requests": workload.num_requests,
        "decode_tokens": workload.decode_tokens,
        "mean_context": workload.mean_context,
        "max_context": workload.max_context,
        **cfg["workload"],
    }
    record["sweep"] = _simulated_sweep(models, info, workload, base["simulated_tokens_per_s"], seed)
    exits = [r for r in rows if r["scheduler"] == "cdb" and r["early_exit"]]
    best = max(exits, key=lambda r: r["measured_vs_vanilla_static"]) if exits else None
    record["metrics"] = {
        "cdb_exit_speedup_measured": best["measured_vs_vanilla_static"] if best else None,
        "cdb_exit_speedup_simulated": best["simulated_vs_vanilla_static"] if best else None,
        "cdb_exit_speedup_model": best["model"] if best else None,
        "max_abs_prediction_error": max(abs(r["prediction_error"]) for r in rows),
    }
    meta = info[cfg["vanilla"]]["latency_tables"]["meta"]
    record["throughput"] = {"device": meta["device"], "clock": meta["clock"]}
    phases["simulator"] = time.perf_counter()
    if cfg["paper_estimate"] is not None:
        paper, roofline = _paper(cfg["paper_estimate"], models)
        if paper is not None:
            record["paper_estimate"] = paper
            record["metrics"]["paper_estimate_speedup"] = paper["speedup_cdb_exit_vs_vanilla_static"]
        if roofline:
            record["paper_roofline"] = roofline
            for estimate in roofline:
                key = estimate["accelerator"]["key"].replace("-", "_")
                record["metrics"][f"paper_roofline_speedup_{key}"] = estimate[
                    "speedup_cdb_exit_vs_vanilla_static"
                ]
    phases["paper_estimate"] = time.perf_counter()
    names = list(phases)
    record["phase_wall_s"] = {b: phases[b] - phases[a] for a, b in zip(names, names[1:], strict=False)}


def _point(ee_record, rule: str, threshold: float | None) -> dict[str, Any] | None:
    if ee_record is None:
        return None
    for point in ee_record.get("sweep", []):
        if point["rule"] == rule and (threshold is None or abs((point["threshold"] or 0) - threshold) < 1e-9):
            return point
    return None


def _held_out_distribution(ee_record, threshold: float) -> list[float] | None:
    point = _point(ee_record, "confidence", threshold)
    return point["exit_distribution"] if point else None


def _quality(ee_record, threshold: float | None) -> dict[str, Any] | None:
    point = (
        _point(ee_record, "confidence", threshold)
        if threshold is not None
        else _point(ee_record, "none", None)
    )
    if point is None:
        return None
    return {"perplexity": point["perplexity"], "average": point["average"], "mean_loops": point["mean_loops"]}


def _outputs_match(details, models) -> dict[str, bool]:
    """Per model: do the greedy outputs of every scheduler without early exit agree?"""
    out = {}
    for rid in models:
        outputs = [d["generated"] for (r, _, e), d in details.items() if r == rid and not e]
        out[rid] = all(o == outputs[0] for o in outputs)
    return out


def _simulated_sweep(models, info, workload, vanilla_static, seed) -> list[dict[str, Any]]:
    """CDB with early exit at every sweep point of each served model (held-out distributions)."""
    from lamda_repro.recursive.serving.simulator import simulate

    out = []
    for rid, entry in models.items():
        ee = entry["early_exit_record"]
        if ee is None:
            continue
        for point in ee.get("sweep", []):
            if point["rule"] == "none":
                continue
            sim = simulate(
                "cdb",
                workload,
                info[rid]["_tables"],
                info[rid]["max_batch"],
                point["exit_distribution"],
                seed,
            )
            out.append(
                {
                    "model": rid,
                    "kind": entry["kind"],
                    "rule": point["rule"],
                    "threshold": point["threshold"],
                    "exit_distribution": point["exit_distribution"],
                    "mean_loops": mean_loops(point["exit_distribution"]),
                    "simulated_tokens_per_s": sim.tokens_per_s,
                    "simulated_vs_vanilla_static": sim.tokens_per_s / vanilla_static,
                    "perplexity": point["perplexity"],
                    "average": point["average"],
                }
            )
    return out


def _paper(pcfg, models) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The paper-geometry estimate on the configured latency-table file (None without one) and
    the roofline estimates of the configured accelerators."""
    from lamda_repro.recursive.serving.paper import paper_estimate, roofline_estimates

    table_file = None
    if pcfg["latency_tables"]:
        path = latency_table_path(pcfg["latency_tables"])
        try:
            table_file = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ServingRunError(
                f"recursive.serving.paper_estimate.latency_tables: cannot read {path} ({exc})"
            ) from None
        table_file["_path"] = str(pcfg["latency_tables"])
    if pcfg["exit_distribution"] is not None:
        dist, source = (
            pcfg["exit_distribution"],
            "config (recursive.serving.paper_estimate.exit_distribution)",
        )
    else:
        rid, entry = next(((r, e) for r, e in models.items() if e["kind"] == "recursive"), (None, None))
        point = _point(entry["early_exit_record"], "oracle", None) if entry else None
        if point is None:
            raise ServingRunError("paper estimate: no served recursive run with an oracle exit distribution")
        if len(point["exit_distribution"]) != pcfg["num_loops"]:
            raise ServingRunError(
                f"paper estimate: the measured distribution has {len(point['exit_distribution'])} loops, "
                f"num_loops is {pcfg['num_loops']}"
            )
        dist, source = (
            point["exit_distribution"],
            f"oracle exits of {rid} on held-out smoke text (measured here)",
        )
    measured = paper_estimate(pcfg, table_file, dist, source) if table_file is not None else None
    geometry = table_file.get("geometry") if table_file is not None else pcfg["geometry"]
    return measured, roofline_estimates(pcfg, geometry, dist, source)


__all__ = ["SERVING_RUN_ID", "ServingRunError", "execute_early_exit", "execute_serving", "held_out_prompts"]
