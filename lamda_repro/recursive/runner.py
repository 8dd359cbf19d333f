"""One recursive run, end to end: base model -> variant -> uptraining -> evaluation -> record.

The ``recursive:`` config section (schema: workflow/schemas/recursive.schema.yaml) lists models,
a corpus, uptraining and evaluation settings, and runs. A run is one variant of one model:

    original   the model as it is (optionally uptrained too)
    recursive  convert_to_recursive(num_loops, sharing, init[, lora_rank, lora_init | relaxation])
    truncated  the model's first K = L / num_loops layers (same-size non-recursive baseline)
    scratch    a K-layer model of the same shape from random init (trained with the uptrain budget)

A run may name a ``teacher``: another run of the same model that keeps its model
(``save_model: true``); the run then distils from that saved model instead of from the base model
as loaded (the paper's teacher is the full-size model uptrained on 15B tokens). The teacher's run
is a dependency of the student's in the workflow.

Artifacts live under ``<workdir>/recursive/`` (corpus, pretrained tiny models, kept run models);
records under ``<results_dir>/runs/recursive/<run_id>.json``. A record says how many tokens the
run's model was trained on here (``tokens_seen``), so that a budget is read from what ran, not
from a label.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lamda_repro.recursive import corpus as corpus_mod
from lamda_repro.recursive import parallel
from lamda_repro.recursive.convert import (
    RecursiveConfigError,
    convert_to_recursive,
    decoder_layers,
    load_causal_lm,
    load_recursive,
    save_recursive,
    truncate_layers,
)
from lamda_repro.recursive.counts import (
    layer_geometry,
    model_non_embedding_parameters,
    model_total_parameters,
    relaxation_parameters,
    weight_bytes,
)
from lamda_repro.recursive.evaluate import forward_throughput, lm_eval_accuracy, perplexity
from lamda_repro.recursive.relax import (
    RelaxationSpec,
    map_shapes,
    relax_recursive,
    relaxation_ranks,
)
from lamda_repro.recursive.relax import (
    relaxation_parameters as counted_relaxation_parameters,
)
from lamda_repro.recursive.spec import RecursionSpec
from lamda_repro.recursive.spectral import RelaxationError, budget_level, check_uniform_rank, units_of
from lamda_repro.recursive.tiny import tiny_config
from lamda_repro.recursive.uptrain import Checkpointing, UptrainConfig, train_causal_lm
from lamda_repro.resume import SigtermFlag, is_transient
from lamda_repro.schema import check_against_schema, load_yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "recursive.schema.yaml"

DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "seed": 0,
    "corpus": {
        "kind": "smoke",
        "num_documents": 2000,
        "num_validation": 100,
        "task_test_size": 100,
        "text_field": "text",
    },
    "models": {},
    "uptrain": {},
    "launch": {"gpus": 1, "nodes": 1},
    "budgets": {},
    "eval": {
        "tasks": list(corpus_mod.SMOKE_TASKS),
        "num_fewshot": 0,
        "limit": None,
        "batch_size": 16,
        "metrics": {},
        "ppl_batches": 8,
        "ppl_batch_size": 8,
        "ppl_seq_len": 64,
        "throughput_batch_size": 8,
        "throughput_seq_len": 64,
    },
    "runs": [],
}
PRETRAIN_DEFAULTS: dict[str, Any] = {
    "architecture": "llama",
    "hidden_size": 64,
    "num_layers": 6,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "steps": 300,
    "batch_size": 16,
    "seq_len": 64,
    "lr": 3e-3,
    "warmup_steps": 20,
}


class RecursiveRunError(ValueError):
    """The recursive config section or a run entry is invalid."""


# -- configuration -------------------------------------------------------------------------------


def resolve_section(section: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the ``recursive:`` section against its schema and fill in defaults."""
    section = copy.deepcopy(section or {})
    schema = load_yaml(SCHEMA_PATH.read_text())
    check_against_schema(section, schema, "recursive")
    out = copy.deepcopy(DEFAULTS)
    for key, value in section.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "models":
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    for split, path in (out["corpus"].get("data_files") or {}).items():
        if out["corpus"].get("kind") == "files" and not Path(path).expanduser().is_file():
            raise RecursiveRunError(f"recursive.corpus.data_files.{split}: data file not found: {path}")
    for name, entry in out["models"].items():
        path = entry.get("path", "")
        if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
            raise RecursiveRunError(f"recursive.models.{name}.path: model folder not found: {path}")
    names = [run_id(run) for run in out["runs"]]
    for name, entry in out["models"].items():
        if "pretrain" in entry and out["corpus"].get("data"):
            raise RecursiveRunError(
                f"recursive.models.{name}.pretrain: pretraining here needs the generated corpus "
                "(corpus.data is set: use model: <a models entry> of the shared pretraining stage)"
            )
    for run in out["runs"]:
        if run["model"] not in out["models"]:
            raise RecursiveRunError(
                f"recursive.runs.{run['name']}.model: unknown model {run['model']!r} "
                f"(defined: {', '.join(sorted(out['models'])) or 'none'})"
            )
        if run["variant"] != "original" and "num_loops" not in run:
            raise RecursiveRunError(f"recursive.runs.{run['name']}: variant {run['variant']} needs num_loops")
        for key in ("lora_rank", "relaxation"):
            if run.get(key) is not None and run["variant"] != "recursive":
                raise RecursiveRunError(
                    f"recursive.runs.{run['name']}.{key}: only applies to variant recursive"
                )
        check_relaxation(out, run)
        if "budget" in run:
            if run["budget"] not in out["budgets"]:
                raise RecursiveRunError(
                    f"recursive.runs.{run['name']}.budget: unknown budget {run['budget']!r} "
                    f"(defined: {', '.join(sorted(out['budgets'])) or 'none'})"
                )
            if run.get("uptrain") is False:
                raise RecursiveRunError(
                    f"recursive.runs.{run['name']}: a budget needs uptraining (uptrain: false)"
                )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecursiveRunError(f"recursive.runs: duplicate runs (model--name) {duplicates}")
    UptrainConfig.from_dict(out["uptrain"])  # one-line error for bad values before any job runs
    for run in out["runs"]:
        uptrain_config(out, run)
        _check_teacher(out, run)
    return out


def _check_teacher(section: dict[str, Any], run: dict[str, Any]) -> None:
    """A named teacher is a run of the same model that saves its model; the chain has no cycle."""
    if run.get("teacher") is None:
        return
    at = f"recursive.runs.{run['name']}.teacher"
    up_cfg = uptrain_config(section, run)
    if up_cfg is None or up_cfg.steps == 0 or up_cfg.kd_weight == 0:
        raise RecursiveRunError(f"{at}: a teacher needs uptraining with kd_weight > 0")
    seen = [run_id(run)]
    current = run
    while current.get("teacher") is not None:
        tid = f"{current['model']}--{current['teacher']}"
        teacher = next((r for r in section["runs"] if run_id(r) == tid), None)
        if teacher is None:
            raise RecursiveRunError(f"{at}: no run {tid!r} (a teacher is a run of the same model)")
        if not teacher.get("save_model"):
            raise RecursiveRunError(f"{at}: run {tid!r} must set save_model: true to be a teacher")
        if tid in seen:
            raise RecursiveRunError(f"{at}: teacher chain {' -> '.join([*seen, tid])} is a cycle")
        seen.append(tid)
        current = teacher


# -- relaxation settings of a run ---------------------------------------------------------------

# Run keys of the flat (lora) form and the RelaxationSpec fields they set.
_FLAT_KEYS = {"lora_rank": "rank", "lora_init": "init"}


def relaxation_settings(run: dict[str, Any], seed: int = 0) -> dict[str, Any] | None:
    """The run's relaxation as RelaxationSpec fields (budget possibly still ``{lora_rank: r}``), or
    None for an unrelaxed run. Flat ``lora_rank`` / ``lora_init`` are the lora form of ``relaxation``."""
    nested = run.get("relaxation")
    flat = {field: run[key] for key, field in _FLAT_KEYS.items() if run.get(key) is not None}
    if nested is not None and flat:
        raise RecursiveRunError(
            f"recursive.runs.{run['name']}: give lora_rank / lora_init or relaxation, not both"
        )
    if nested is None and "rank" not in flat:
        if flat:
            raise RecursiveRunError(f"recursive.runs.{run['name']}.lora_init: needs lora_rank")
        return None
    settings = dict(nested) if nested is not None else flat
    settings["per_position_vectors"] = bool(run.get("per_position_vectors", False))
    settings["seed"] = seed
    return settings


def _key_of(run: dict[str, Any], field: str) -> str:
    """The config key behind a RelaxationSpec field of ``run`` (for one-line errors)."""
    if run.get("relaxation") is None:
        flat = {value: key for key, value in _FLAT_KEYS.items()}
        return f"recursive.runs.{run['name']}.{flat.get(field, field)}"
    return f"recursive.runs.{run['name']}.relaxation.{field}"


def budget_parameters(budget: Any, maps: dict[str, tuple[int, int]], num_layers: int, num_loops: int) -> int:
    """A budget in parameters: an integer as is, ``{lora_rank: r}`` as what lora at rank r adds."""
    if isinstance(budget, dict):
        return relaxation_parameters(maps, num_layers, num_loops, "lora", int(budget["lora_rank"]))
    return int(budget)


def relaxation_spec(
    run: dict[str, Any], maps: dict[str, tuple[int, int]], num_layers: int, seed: int = 0
) -> RelaxationSpec | None:
    """The run's RelaxationSpec on a model of this geometry, checked against what its residuals
    allow (rank caps, budget limits); RecursiveRunError names the config key."""
    settings = relaxation_settings(run, seed)
    if settings is None:
        return None
    loops = run["num_loops"]
    try:
        if settings.get("budget") is not None:
            settings["budget"] = budget_parameters(settings["budget"], maps, num_layers, loops)
        relax = RelaxationSpec(**settings)
        units = units_of(relax.kind, maps, num_layers, loops)
        if relax.rank is not None:
            check_uniform_rank(relax.kind, units, relax.rank, relax.rank_in)
        if relax.budget is not None:
            budget_level(relax.kind, units, relax.budget)
    except RelaxationError as exc:
        raise RecursiveRunError(f"{_key_of(run, exc.field)}: {exc}") from None
    return relax


def _config_geometry(section: dict[str, Any], name: str) -> tuple[int, dict[str, tuple[int, int]]] | None:
    """(L, {map: (d_in, d_out)}) of model entry ``name`` when known before any job (a tiny model's
    settings, or a local folder with config.json); None otherwise (checked when the run builds)."""
    entry = section["models"][name]
    try:
        if "pretrain" in entry:
            p = {**PRETRAIN_DEFAULTS, **entry["pretrain"]}
            config = tiny_config(
                p["architecture"],
                vocab_size=32,
                hidden_size=p["hidden_size"],
                num_layers=p["num_layers"],
                num_heads=p["num_heads"],
                num_kv_heads=p["num_kv_heads"],
                intermediate_size=p["intermediate_size"],
            )
        elif entry.get("path") and (Path(entry["path"]) / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(entry["path"])
        else:
            return None
        num_layers, _, _, maps = layer_geometry(config)
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return num_layers, maps


def check_relaxation(section: dict[str, Any], run: dict[str, Any]) -> None:
    """One-line errors for a run's relaxation before any job: settings always, ranks and budgets
    against the model's shapes when those are known from the config."""
    settings = relaxation_settings(run, section["seed"])
    if settings is None:
        return
    geometry = _config_geometry(section, run["model"])
    if geometry is None:
        try:
            RelaxationSpec(**{**settings, "budget": 1 if settings.get("budget") is not None else None})
        except RelaxationError as exc:
            raise RecursiveRunError(f"{_key_of(run, exc.field)}: {exc}") from None
        return
    num_layers, maps = geometry
    if num_layers % run["num_loops"]:
        raise RecursiveRunError(
            f"recursive.runs.{run['name']}.num_loops: {run['num_loops']} does not divide the model's "
            f"{num_layers} layers"
        )
    relaxation_spec(run, maps, num_layers, section["seed"])


def run_id(run: dict[str, Any]) -> str:
    """The id (and record file stem) of a run: ``<model>--<name>``."""
    return f"{run['model']}--{run['name']}"


def find_run(section: dict[str, Any], rid: str) -> dict[str, Any]:
    for run in section["runs"]:
        if run_id(run) == rid:
            return run
    raise RecursiveRunError(
        f"no recursive run {rid!r} (known: {', '.join(run_id(r) for r in section['runs'])})"
    )


def run_artifacts(section: dict[str, Any], rid: str, workdir: str | Path) -> list[str]:
    """Files a run needs before it starts (the workflow's inputs of the run job)."""
    run = find_run(section, rid)
    return [
        str(corpus_dir(Path(workdir)) / "corpus.json"),
        *base_artifacts(section, run["model"], workdir),
        str(token_manifest(workdir, tokenizer_key(section, run["model"]))),
    ]


def base_artifacts(section: dict[str, Any], name: str, workdir: str | Path) -> list[str]:
    """Files model entry ``name`` needs before it loads (a pretrained tiny model's weights, or
    the built folder of a model of the shared pretraining stage)."""
    entry = section["models"][name]
    if "pretrain" in entry:
        return [str(model_dir(Path(workdir), name) / "model.safetensors")]
    if "model" in entry:
        return [str(shared_model_dir(workdir, entry["model"]) / "config.json")]
    return []


def base_model_path(section: dict[str, Any], name: str, workdir: str | Path) -> str:
    """Where model entry ``name`` loads from: its pretrained folder, or its path / Hub id."""
    entry = section["models"][name]
    if "model" in entry:
        return str(shared_model_dir(workdir, entry["model"]))
    return str(model_dir(Path(workdir), name)) if "pretrain" in entry else entry["path"]


def shared_model_dir(workdir: str | Path, name: str) -> Path:
    """The folder of model ``name`` of the config's models section (built and pretrained by the
    shared pretraining stage, rule build_model)."""
    return Path(workdir) / "models" / name


def relaxed_models(section: dict[str, Any]) -> list[str]:
    """Model entries with at least one relaxed run (they get a weight-error table)."""
    return sorted({run["model"] for run in section["runs"] if relaxation_settings(run) is not None})


def relaxed_run_shapes(section: dict[str, Any], name: str) -> tuple[list[int], list[str]]:
    """(num_loops values, shared-layer inits) of model ``name``'s relaxed runs."""
    runs = [r for r in section["runs"] if r["model"] == name and relaxation_settings(r) is not None]
    return sorted({r["num_loops"] for r in runs}), sorted({r.get("init", "stepwise") for r in runs})


def budget_lora_ranks(section: dict[str, Any], name: str) -> list[int]:
    """The budgets (as lora ranks) of model ``name``'s relaxed runs: lora ranks of its lora runs
    and ``{lora_rank: r}`` budgets."""
    ranks = set()
    for run in section["runs"]:
        settings = relaxation_settings(run) if run["model"] == name else None
        if settings is None:
            continue
        budget = settings.get("budget")
        if isinstance(budget, dict):
            ranks.add(int(budget["lora_rank"]))
        elif settings.get("kind", "lora") == "lora" and settings.get("rank"):
            ranks.add(int(settings["rank"]))
    return sorted(ranks)


def run_teacher(section: dict[str, Any], rid: str) -> str | None:
    """The run id of the run's teacher (whose saved model it distils from), or None."""
    run = find_run(section, rid)
    return f"{run['model']}--{run['teacher']}" if run.get("teacher") is not None else None


def run_job_inputs(section: dict[str, Any], rid: str, workdir: str | Path, results: str | Path) -> list[str]:
    """The inputs of the run's workflow job: its artifacts and, for a run that names a teacher,
    the teacher's record (so the teacher runs first; its saved model is read from the workdir)."""
    inputs = run_artifacts(section, rid, workdir)
    teacher = run_teacher(section, rid)
    if teacher is not None:
        inputs.append(f"{results}/runs/recursive/{teacher}.json")
    return inputs


def uptrain_config(section: dict[str, Any], run: dict[str, Any]) -> UptrainConfig | None:
    """The run's uptraining settings, or None when the run is not uptrained.

    Section ``uptrain`` < the run's ``budget`` (a named entry of ``budgets``) < the run's own
    ``uptrain`` overrides. A budget implies uptraining, also for variant original.
    """
    setting = run.get("uptrain", run["variant"] != "original" or "budget" in run)
    if setting is False:
        return None
    budget = section.get("budgets", {}).get(run.get("budget"), {})
    overrides = setting if isinstance(setting, dict) else {}
    try:
        return UptrainConfig.from_dict({**section["uptrain"], **budget, **overrides})
    except ValueError as exc:
        raise RecursiveRunError(f"recursive.runs.{run['name']}: {exc}") from None


def corpus_dir(workdir: Path) -> Path:
    return Path(workdir) / "recursive" / "corpus"


def model_dir(workdir: Path, name: str) -> Path:
    return Path(workdir) / "recursive" / "models" / name


def saved_model_dir(workdir: Path, rid: str) -> Path:
    """Where a run with ``save_model`` (or ``early_exit``) keeps its model; records name it too."""
    return Path(workdir) / "recursive" / "runs" / rid


def pick_device(device: str) -> torch.device:
    if parallel.active() and torch.cuda.is_available() and device in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- artifacts -----------------------------------------------------------------------------------


def prepare_corpus(section: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Write the smoke corpus, tokenizer and tasks (kind smoke); other kinds need no preparation."""
    cfg = section["corpus"]
    out = corpus_dir(workdir)
    if cfg["kind"] == "smoke" and cfg.get("data"):  # documents of the shared general corpus
        tasks = corpus_mod.write_smoke_tasks(out / "tasks", section["seed"], cfg["task_test_size"])
        info = {"kind": "smoke", "data": cfg["data"], "seed": section["seed"], "tasks": tasks}
        (out / "corpus.json").write_text(json.dumps(info, indent=2))
        return info
    if cfg["kind"] != "smoke":
        out.mkdir(parents=True, exist_ok=True)
        info = {"kind": cfg["kind"]}
        (out / "corpus.json").write_text(json.dumps(info))
        return info
    return corpus_mod.write_smoke_corpus(
        out, cfg["num_documents"], cfg["num_validation"], section["seed"], cfg["task_test_size"]
    )


def _corpus_entry(section: dict[str, Any], workdir: Path) -> dict[str, Any]:
    cfg = dict(section["corpus"])
    if cfg["kind"] == "smoke":
        data = cfg.get("data")
        cfg["path"] = str(Path(workdir) / "data" / data) if data else str(corpus_dir(workdir))
    return cfg


# -- token shards (the tokenize stage's output; docs/recursive.md "Uptraining data") -------------


def tokens_root(workdir: str | Path) -> Path:
    return Path(workdir) / "recursive" / "tokens"


def token_manifest(workdir: str | Path, key: str) -> Path:
    from lamda_repro.recursive.shards import MANIFEST

    return tokens_root(workdir) / key / MANIFEST


def tokenizer_key(section: dict[str, Any], name: str) -> str:
    """The name of model entry ``name``'s token set: models that load the same tokenizer share it
    (a tiny model pretrained here uses the corpus's tokenizer: key ``corpus``)."""
    entry = section["models"][name]
    if "pretrain" in entry:
        return "corpus"
    source = entry.get("tokenizer") or entry.get("model") or entry["path"]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_.") or "tokenizer"


def tokenizer_keys(section: dict[str, Any]) -> list[str]:
    """Every token set the section's runs and pretrained models read."""
    names = {run["model"] for run in section["runs"]}
    names |= {name for name, entry in section["models"].items() if "pretrain" in entry}
    return sorted({tokenizer_key(section, name) for name in names})


def tokenizer_owner(section: dict[str, Any], key: str) -> str:
    """The first model entry whose tokenizer is token set ``key``'s."""
    for name in sorted(section["models"]):
        if tokenizer_key(section, name) == key:
            return name
    raise RecursiveRunError(f"no recursive.models entry uses token set {key!r}")


def tokenize_inputs(section: dict[str, Any], key: str, workdir: str | Path) -> list[str]:
    """Files the tokenize job of ``key`` needs: the corpus stage's output and the tokenizer's model."""
    inputs = [str(corpus_dir(Path(workdir)) / "corpus.json")]
    name = tokenizer_owner(section, key)
    if key != "corpus" and "tokenizer" not in section["models"][name]:
        inputs += base_artifacts(section, name, workdir)
    return inputs


def token_budgets(section: dict[str, Any], key: str | None = None) -> dict[str, int]:
    """Tokens each split of token set ``key`` (None: any) must hold: training, what the largest
    run that reads it (uptraining, early-exit post-training, pretraining here) reads, unless
    ``corpus.train_tokens`` says otherwise; held out, what the largest perplexity or early-exit
    sweep reads (``corpus.validation_tokens``)."""
    from lamda_repro.recursive.early_exit import EarlyExitConfig

    train = [0]
    held_out = [0]
    ev = section["eval"]
    held_out.append(ev["ppl_batches"] * ev["ppl_batch_size"] * (ev["ppl_seq_len"] + 1))
    for run in section["runs"]:
        if key is not None and tokenizer_key(section, run["model"]) != key:
            continue
        cfg = uptrain_config(section, run)
        if cfg is not None:
            train.append(cfg.steps * cfg.grad_accum * cfg.batch_size * cfg.seq_len)
        if run.get("early_exit"):
            overrides = run["early_exit"] if isinstance(run["early_exit"], dict) else {}
            ee = EarlyExitConfig.from_dict({**(section.get("early_exit") or {}), **overrides})
            train.append(ee.steps * ee.grad_accum * ee.batch_size * ee.seq_len)
            held_out.append(ee.eval_batches * ee.eval_batch_size * (ee.eval_seq_len + 1))
    for entry in section["models"].values():
        if "pretrain" in entry and key in (None, "corpus"):
            p = {**PRETRAIN_DEFAULTS, **entry["pretrain"]}
            train.append(p["steps"] * p["batch_size"] * p["seq_len"])
    corpus = section["corpus"]
    return {
        "train": int(corpus.get("train_tokens") or max(train) or 1),
        "validation": int(corpus.get("validation_tokens") or max(held_out)),
    }


def tokenize_corpus(section: dict[str, Any], key: str, workdir: Path, workers: int = 1) -> dict[str, Any]:
    """The tokenize stage for token set ``key``: shards + manifest under ``tokens/<key>/``."""
    from lamda_repro.recursive.shard_writer import write_token_set

    name = tokenizer_owner(section, key)
    entry = section["models"][name]
    if key == "corpus":
        tokenizer_path = str(corpus_dir(workdir) / "tokenizer")
    else:
        tokenizer_path = entry.get("tokenizer") or base_model_path(section, name, workdir)
    cfg = _corpus_entry(section, workdir)
    return write_token_set(
        section["corpus"],
        lambda split: corpus_mod.iter_texts(cfg, split),
        corpus_mod.source_description(cfg),
        tokenizer_path,
        tokens_root(workdir) / key,
        token_budgets(section, key),
        workers=workers,
        docs_per_shard=section["corpus"].get("docs_per_shard", 4096),
    )


def train_batches(section, workdir, tokenizer, seq_len, batch_size, split="train"):
    """Batches of ``split`` from the token set of ``tokenizer`` (found by its digest): training
    batches in the seeded order of the section's seed, this rank's rows of every global batch
    when torch.distributed runs several processes; held-out batches in order, one pass, whole."""
    from lamda_repro.recursive.parallel import rank_and_world
    from lamda_repro.recursive.shard_writer import corpus_digest
    from lamda_repro.recursive.shards import SequenceLoader, TokenShards, find_token_set, tokenizer_digest

    folder = find_token_set(
        tokens_root(workdir), tokenizer_digest(tokenizer), corpus_digest(section["corpus"])
    )
    train = split == "train"
    rank, world = rank_and_world() if train else (0, 1)
    return SequenceLoader(
        TokenShards(folder, split),
        seq_len,
        batch_size,
        seed=section["seed"],
        shuffle=train,
        repeat=train,
        rank=rank,
        world_size=world,
    )


def pretrain_model(section: dict[str, Any], name: str, workdir: Path, device: torch.device) -> dict[str, Any]:
    """Pretrain the tiny model ``name`` on the smoke corpus and save it (safetensors) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = section["models"][name]
    if "pretrain" not in entry:
        raise RecursiveRunError(f"recursive.models.{name}: no pretrain settings (it loads from path)")
    p = {**PRETRAIN_DEFAULTS, **entry["pretrain"]}
    tokenizer = AutoTokenizer.from_pretrained(corpus_dir(workdir) / "tokenizer")
    torch.manual_seed(section["seed"])
    config = tiny_config(
        p["architecture"],
        vocab_size=len(tokenizer),
        hidden_size=p["hidden_size"],
        num_layers=p["num_layers"],
        num_heads=p["num_heads"],
        num_kv_heads=p["num_kv_heads"],
        intermediate_size=p["intermediate_size"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config).to(device)
    cfg = UptrainConfig(
        steps=p["steps"],
        batch_size=p["batch_size"],
        seq_len=p["seq_len"],
        lr=p["lr"],
        warmup_steps=p["warmup_steps"],
        weight_decay=0.01,
        kd_weight=0.0,
    )
    # Resumable like uptraining (SIGTERM: checkpoint, then Preempted; the retry resumes).
    ckpt_dir = Path(workdir) / "checkpoints" / "recursive-pretrain" / name
    with SigtermFlag() as sigterm:
        sigterm.training = True
        stats = train_causal_lm(
            model,
            train_batches(section, workdir, tokenizer, cfg.seq_len, cfg.batch_size),
            cfg,
            seed=section["seed"],
            desc=f"pretrain {name}",
            checkpointing=Checkpointing(
                ckpt_dir,
                _spec_digest(
                    {"pretrain": p, "seed": section["seed"], "corpus": _corpus_digest(section, workdir)}
                ),
                sigterm,
            ),
        )
    out = model_dir(workdir, name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"settings": p, "stats": stats}, indent=2))
    return stats


def load_base(section: dict[str, Any], name: str, workdir: Path, device: torch.device):
    """(model, tokenizer) of model entry ``name``: its pretrained folder or its path / Hub id."""
    from transformers import AutoTokenizer

    entry = section["models"][name]
    path = base_model_path(section, name, workdir)
    dtype = getattr(torch, entry.get("dtype", "float32"))
    # The entry's Hub revision applies to its own path, not to a folder pretrained or uptrained here.
    revision = entry.get("revision") if str(path) == entry.get("path") else None
    model = load_causal_lm(path, dtype=dtype, revision=revision).to(device)  # recursive: load_recursive
    model.eval()
    tok_kwargs = {"revision": revision} if revision and "tokenizer" not in entry else {}
    tokenizer = AutoTokenizer.from_pretrained(entry.get("tokenizer", path), **tok_kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_teacher(section: dict[str, Any], tid: str, workdir: Path, device: torch.device) -> nn.Module:
    """The saved model of teacher run ``tid`` (one-line error when the teacher left none)."""
    folder = saved_model_dir(workdir, tid)
    if not (folder / "model.safetensors").is_file():
        raise RecursiveRunError(
            f"teacher run {tid} has no saved model in {folder} (did it fail? see its record)"
        )
    entry = section["models"][find_run(section, tid)["model"]]
    teacher = load_recursive(folder, dtype=getattr(torch, entry.get("dtype", "float32"))).to(device)
    teacher.eval()
    return teacher


def build_variant(base: nn.Module, run: dict[str, Any], seed: int) -> nn.Module:
    """The model a run trains and evaluates, built from the base model (left unchanged).

    Every random draw (random init, zero-init LoRA, scratch init) is seeded by ``seed``."""
    from transformers import AutoModelForCausalLM

    variant = run["variant"]
    if variant == "original":
        return copy.deepcopy(base)
    num_layers = len(decoder_layers(base))
    loops = run["num_loops"]
    if num_layers % loops:
        raise RecursiveConfigError(f"num_loops={loops} does not divide the model's {num_layers} layers")
    if variant == "recursive":
        recursive = convert_to_recursive(
            base, loops, sharing=run.get("sharing", "cycle"), init=run.get("init", "stepwise"), seed=seed
        )
        relax = relaxation_spec(run, map_shapes(decoder_layers(base)[0]), num_layers, seed)
        if relax is not None:
            relax_recursive(recursive, base, relax)
        return recursive
    if variant == "truncated":
        return truncate_layers(base, num_layers // loops)
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = num_layers // loops
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[: config.num_hidden_layers])
    torch.manual_seed(seed)
    param = next(base.parameters())
    return AutoModelForCausalLM.from_config(config, dtype=param.dtype).to(param.device)


def relaxation_record(model: nn.Module) -> dict[str, Any] | None:
    """What a record says about a relaxed model: kind, budget, ranks, trained groups and the
    relaxation's parameters, counted on the model and from the closed form (which must agree)."""
    recursion = getattr(model.config, "recursion", None) or {}
    if not recursion.get("lora"):
        return None
    relax = RelaxationSpec(**recursion["lora"])
    spec = RecursionSpec(**{k: v for k, v in recursion.items() if k != "lora"})
    ranks = relaxation_ranks(model)
    maps = map_shapes(decoder_layers(model)[0], relax.target_modules)
    closed = relaxation_parameters(maps, spec.num_layers, spec.num_loops, relax.kind, rank_pattern=ranks)
    counted = counted_relaxation_parameters(model)
    if closed != counted:
        raise RecursiveConfigError(f"relaxation parameters: counted {counted:,} != closed form {closed:,}")
    histogram: dict[str, int] = {}
    for r_out, r_in in ranks.values():
        label = str(r_out) if r_out == r_in else f"{r_out}x{r_in}"
        histogram[label] = histogram.get(label, 0) + 1
    return {
        "kind": relax.kind,
        "init": relax.init,
        "budget": relax.budget,
        "allocation": relax.allocation if relax.budget is not None else None,
        "rank": relax.rank,
        "rank_in": relax.rank_in,
        "rank_histogram": dict(sorted(histogram.items(), key=lambda kv: [int(x) for x in kv[0].split("x")])),
        "train": list(relax.train_groups),
        "parameters": counted,
        "parameters_closed_form": closed,
    }


# -- one run -------------------------------------------------------------------------------------


def execute_run(section: dict[str, Any], rid: str, workdir: Path, device: str = "auto") -> dict[str, Any]:
    """Run ``rid`` and return its record (status "failed" with the error if anything raised)."""
    from lamda_repro.results import new_record, utc_now

    run = find_run(section, rid)
    entry = section["models"][run["model"]]
    up_cfg = uptrain_config(section, run)
    distils = up_cfg is not None and up_cfg.steps > 0 and up_cfg.kd_weight > 0
    spec = {
        "run": run,
        "model": entry,
        "uptrain": up_cfg.to_dict() if up_cfg else None,
        # The model distilled from: a teacher run's saved model, or the base model as loaded.
        "teacher": (run_teacher(section, rid) or "base") if distils else None,
        "eval": section["eval"],
        "corpus": section["corpus"],
        "seed": section["seed"],
    }
    record = new_record(rid, "recursive", spec)
    start = time.perf_counter()
    try:
        with SigtermFlag() as sigterm:
            _fill_record(record, section, run, up_cfg, workdir, pick_device(device), sigterm)
        record["status"] = "success"
    except Exception as exc:  # the record must say why a run failed
        if is_transient(exc):  # no record: the scheduler retries, the rerun resumes
            raise
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=8)
    record["wall_time_s"] = time.perf_counter() - start
    record["finished_at"] = utc_now()
    return record


def _corpus_digest(section: dict[str, Any], workdir: Path) -> str | None:
    """Digest of the local (smoke) corpus folder; None for a corpus the spec names."""
    from lamda_repro.resume import folder_digest

    corpus = _corpus_entry(section, workdir)
    return folder_digest(corpus["path"]) if corpus["kind"] == "smoke" else None


def _input_digests(section: dict[str, Any], model: str, workdir: Path) -> dict[str, str]:
    """Digests of the files an uptraining run reads besides its spec: the local corpus (smoke
    kind; a Hub or file corpus is named in the spec), the token shards' manifest and the base
    model's folder (a Hub id is named in the spec). Part of the run's identity: its checkpoints
    resume only the same inputs."""
    from lamda_repro.resume import folder_digest

    inputs = {"corpus": _corpus_digest(section, workdir)}
    manifest = token_manifest(workdir, tokenizer_key(section, model))
    if manifest.is_file():  # the token shards it trains on (their digests; not the clock readings)
        listed = {k: v for k, v in json.loads(manifest.read_text()).items() if not k.endswith("_time_s")}
        inputs["tokens"] = hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()
    base = Path(base_model_path(section, model, workdir))
    if base.is_dir():
        inputs["model"] = folder_digest(base)
    return inputs


def _spec_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fill_record(record, section, run, up_cfg, workdir, device, sigterm=None) -> None:
    seed = section["seed"]
    ev = section["eval"]
    base, tokenizer = load_base(section, run["model"], workdir, device)
    # An original model that is not trained is evaluated as loaded (no copy).
    model = base if run["variant"] == "original" and up_cfg is None else build_variant(base, run, seed)
    record["params"] = {
        "non_embedding": model_non_embedding_parameters(model),
        "total": model_total_parameters(model),
        "non_embedding_base": model_non_embedding_parameters(base),
        "weight_bytes": weight_bytes(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    record["method_info"] = {
        "variant": run["variant"],
        "num_layers": len(decoder_layers(model)),
        "recursion": getattr(model.config, "recursion", None),
    }
    record["tokens_seen"] = 0  # tokens this run trained its model on (its budget, as it ran)
    relaxation = relaxation_record(model)
    if relaxation is not None:
        record["method_info"]["relaxation"] = relaxation
        record["params"]["relaxation"] = relaxation["parameters"]
    if up_cfg is not None and up_cfg.steps > 0:
        tid = run_teacher(section, run_id(run)) if up_cfg.kd_weight > 0 else None
        teacher = base if up_cfg.kd_weight > 0 and tid is None else None
        base = None  # from here on only needed as the default teacher: free it before loading one
        if tid is not None:
            teacher = load_teacher(section, tid, workdir, device)
        batches = train_batches(section, workdir, tokenizer, up_cfg.seq_len, up_cfg.batch_size)
        checkpointing = Checkpointing(
            Path(workdir) / "checkpoints" / "recursive" / run_id(run),
            _spec_digest({"spec": record["spec"], "inputs": _input_digests(section, run["model"], workdir)}),
            sigterm,
        )
        if sigterm is not None:
            sigterm.training = True
        stats = train_causal_lm(
            model, batches, up_cfg, teacher=teacher, seed=seed, desc=run_id(run), checkpointing=checkpointing
        )
        if sigterm is not None:
            sigterm.training = False
        del teacher
        record["train"] = stats
        record["resume"] = {"resumed": stats["resumed"], "from_step": stats["resumed_from_step"]}
        record["tokens_seen"] = stats["tokens"]
        record["throughput"]["train_tokens_per_s"] = stats["train_tokens_per_s"]
        if not parallel.is_main_process():
            return  # rank 0 alone evaluates, saves and writes the record
    del base
    include = str(corpus_dir(workdir) / "tasks") if section["corpus"]["kind"] == "smoke" else None
    scores = lm_eval_accuracy(
        model,
        tokenizer,
        ev["tasks"],
        include_path=include,
        num_fewshot=ev["num_fewshot"],
        limit=ev["limit"],
        batch_size=ev["batch_size"],
        metrics=ev["metrics"],
        seed=seed,
    )
    record["metrics"] = {f"acc_{task}": value for task, value in scores.items()}
    record["metrics"]["average"] = sum(scores.values()) / len(scores)
    held_out = train_batches(
        section, workdir, tokenizer, ev["ppl_seq_len"], ev["ppl_batch_size"], "validation"
    )
    record["metrics"]["perplexity"] = perplexity(model, held_out, max_batches=ev["ppl_batches"])
    record["primary_metric"] = "average"
    record["throughput"].update(
        forward_throughput(
            model, model.config.vocab_size, ev["throughput_batch_size"], ev["throughput_seq_len"]
        )
    )
    if run.get("save_model") or run.get("early_exit"):  # early-exit post-training starts from it
        out = save_recursive(model, saved_model_dir(workdir, run_id(run)), tokenizer)
        record.setdefault("artifacts", {})["model_dir"] = str(out)
