"""Configuration: loading, validation with one-line errors, and expansion into run specs.

The config is validated in two passes before any job runs:
1. the JSON schema in ``workflow/schemas/`` (the same file Snakemake validates against);
2. semantic checks the schema cannot express: references between sections (an experiment
   naming an unknown method), each method's and task's own parameters, data generators.
Every problem is reported as one line naming the key and the problem.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from lamda_repro.schema import (  # noqa: F401  (re-exported: the config API)
    REPO_ROOT,
    SCHEMA_DIR,
    SCHEMA_PATH,
    ConfigError,
    DuplicateKeyError,
    check_against_schema,
    load_schema,
    load_yaml,
    yaml_problem,
)

# -- loading -------------------------------------------------------------------------------


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(*paths: str | Path) -> dict[str, Any]:
    """Read and merge YAML config files (later files override earlier ones, as Snakemake does)."""
    config: dict[str, Any] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = load_yaml(p.read_text())
        except DuplicateKeyError as exc:
            raise ConfigError(f"{p}: {yaml_problem(exc)}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({yaml_problem(exc)})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
        config = _deep_merge(config, data)
    return config


# -- defaults ------------------------------------------------------------------------------

TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 3,
    "max_steps": -1,
    "batch_size": 16,
    "eval_batch_size": 32,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "warmup_ratio": 0.0,
    "lr_scheduler": "linear",
    "max_length": 128,
    "max_target_length": 64,
    "grad_accum": 1,
    "logging_steps": 10,
    "save_steps": 0,
    "precision": "fp32",
    "max_grad_norm": 1.0,
}
# Decoding settings are passed through only where the config sets them: each task has its own
# defaults (e.g. GSM8K needs longer answers than E2E).
GENERATION_DEFAULTS: dict[str, Any] = {}
TOP_DEFAULTS: dict[str, Any] = {
    "scale": "smoke",
    "workdir": "work",
    "results_dir": "results",
    "logs_dir": "logs",
    "offline": True,
    "device": "auto",
    "threads": 0,
    "warm_start": False,
    "data": {},
    "models": {},
    "tasks": {},
    "methods": {},
}


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for k, v in TOP_DEFAULTS.items():
        out.setdefault(k, copy.deepcopy(v))
    return out


# -- validation ----------------------------------------------------------------------------

# Sections owned by a stage above this layer (the recursive stage owns ``recursive:``). The stage
# registers its check when its package is imported, so that config.py never imports a stage;
# validate_config refuses to pass an enabled section whose check was never registered.
STAGE_SECTIONS = ("recursive",)
_SECTION_CHECKS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Any]] = {}


def register_section_check(section: str, check: Callable[[dict[str, Any], dict[str, Any]], Any]) -> None:
    """Register ``check(section_value, config)`` (raises ConfigError / ValueError) for a stage's
    section; ``config`` is the whole config with defaults, for references into its other sections."""
    if section not in STAGE_SECTIONS:
        raise ValueError(f"unknown stage section {section!r} (known: {', '.join(STAGE_SECTIONS)})")
    _SECTION_CHECKS[section] = check


def _check_model(name: str, entry: dict[str, Any], data: dict[str, Any]) -> None:
    where = f"models.{name}"
    need = {"hub": "id", "local": "path", "package": "package", "build": "config"}[entry["source"]]
    if need not in entry:
        raise ConfigError(f"{where}: source {entry['source']!r} needs key {need!r}")
    if entry["source"] == "local" and not Path(entry["path"]).expanduser().is_dir():
        raise ConfigError(f"{where}.path: model folder not found: {entry['path']}")
    if entry["source"] == "build":
        if "model_type" not in entry["config"]:
            raise ConfigError(f"{where}.config: missing required key 'model_type'")
        if "tokenizer" not in entry:
            raise ConfigError(f"{where}: source 'build' needs key 'tokenizer'")
        if entry["tokenizer"]["data"] not in data:
            raise ConfigError(
                f"{where}.tokenizer.data: unknown data set {entry['tokenizer']['data']!r}"
                f" (defined: {', '.join(sorted(data)) or 'none'})"
            )
    for key in ("pretrain", "seed"):
        if key in entry and entry["source"] != "build":
            raise ConfigError(f"{where}.{key}: only applies to source 'build'")
    if entry.get("pretrain") is not None:
        from lamda_repro.models import ENCODER_DECODER_TYPES
        from lamda_repro.pretrain import PretrainError, pretrain_settings

        try:
            pretrain_settings(entry["pretrain"], entry["config"]["model_type"] in ENCODER_DECODER_TYPES)
        except PretrainError as exc:
            raise ConfigError(f"{where}.{exc}") from None


def _check_refs(where: str, names: list[str], defined: dict, what: str) -> None:
    for i, n in enumerate(names):
        if n not in defined:
            raise ConfigError(
                f"{where}[{i}]: unknown {what} {n!r} (defined: {', '.join(sorted(defined)) or 'none'})"
            )


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check the whole config; return it with defaults filled in. Raises ConfigError."""
    if not isinstance(config, dict):
        raise ConfigError(f"<config>: top level must be a mapping, got {type(config).__name__}")
    check_against_schema(config, load_schema())
    cfg = with_defaults(config)

    from lamda_repro.methods.base import MethodConfigError, get_method_class
    from lamda_repro.tasks.base import TaskConfigError, get_task_class
    from lamda_repro.tasks.smoke import generator_names

    gens = generator_names()
    for name, entry in cfg["data"].items():
        if entry["generator"] not in gens:
            raise ConfigError(
                f"data.{name}.generator: unknown generator {entry['generator']!r} (known: {', '.join(gens)})"
            )
    for name, entry in cfg["models"].items():
        _check_model(name, entry, cfg["data"])
    for name, entry in cfg["tasks"].items():
        try:
            cls = get_task_class(entry["type"])
        except TaskConfigError as exc:
            raise ConfigError(f"tasks.{name}.type: {exc}") from None
        cls.check_params(entry, f"tasks.{name}")
        for split, path in entry.get("data_files", {}).items():
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"tasks.{name}.data_files.{split}: data file not found: {path}")
        if "data" in entry and entry["data"] not in cfg["data"]:
            raise ConfigError(
                f"tasks.{name}.data: unknown data set {entry['data']!r} "
                f"(defined: {', '.join(sorted(cfg['data'])) or 'none'})"
            )
    for name, entry in cfg["methods"].items():
        try:
            cls = get_method_class(entry["type"])
        except MethodConfigError as exc:
            raise ConfigError(f"methods.{name}.type: {exc}") from None
        params = {k: v for k, v in entry.items() if k != "training"}
        cls.check_params(params, f"methods.{name}")
        if "training" in entry:
            check_against_schema(
                entry["training"], {"$ref": "config.schema.yaml#/$defs/training"}, f"methods.{name}.training"
            )
    if cfg["device"] == "cpu":  # fp16 training needs CUDA (device auto is checked when the run starts)
        blocks = {"training": cfg.get("training", {})}
        blocks.update(
            {f"experiments.{n}.training": e.get("training", {}) for n, e in cfg["experiments"].items()}
        )
        blocks.update({f"methods.{n}.training": m.get("training", {}) for n, m in cfg["methods"].items()})
        for where, block in blocks.items():
            if block.get("precision") == "fp16":
                raise ConfigError(
                    f"{where}.precision: fp16 needs a CUDA device (device: cpu); use fp32 or bf16"
                )
    for name, exp in cfg["experiments"].items():
        where = f"experiments.{name}"
        _check_refs(f"{where}.models", exp["models"], cfg["models"], "model")
        _check_refs(f"{where}.tasks", exp["tasks"], cfg["tasks"], "task")
        _check_refs(f"{where}.methods", exp["methods"], cfg["methods"], "method")
        kinds = {get_task_class(cfg["tasks"][t]["type"]).task_kind for t in exp["tasks"]}
        if len(kinds) > 1:
            raise ConfigError(
                f"{where}.tasks: mixes task kinds {sorted(kinds)}; "
                "one experiment uses one model head (split it in two)"
            )
    for section in STAGE_SECTIONS:
        value = cfg.get(section)
        if not value or not value.get("enabled", True):
            continue
        check = _SECTION_CHECKS.get(section)
        if check is None:  # a programming error, not a config error: the stage was never imported
            raise RuntimeError(
                f"no check registered for the config section {section!r}: import lamda_repro.{section} first"
            )
        try:
            check(value, cfg)
        except ConfigError:
            raise
        except ValueError as exc:  # the stage's own value checks
            raise ConfigError(str(exc).splitlines()[0]) from None
    return cfg


# -- run specs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run: everything needed to reproduce it, and nothing else."""

    experiment: str
    family: str
    task: str
    task_params: dict[str, Any]
    model: str
    model_params: dict[str, Any]
    method: str
    method_type: str
    method_params: dict[str, Any]
    seed: int
    training: dict[str, Any]
    generation: dict[str, Any] = field(default_factory=dict)
    scale: str = "smoke"  # "smoke" or "paper": which claims a record can speak to

    @property
    def run_id(self) -> str:
        return f"{self.experiment}/{self.task}/{self.model}/{self.method}/seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        return cls(**d)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def record_path(results_dir: str, run_id: str) -> str:
    return f"{results_dir}/runs/{run_id}.json"


def expand_runs(config: dict[str, Any]) -> list[RunSpec]:
    """All fine-tuning runs of a validated config, in a stable order."""
    from lamda_repro.tasks.base import get_task_class

    cfg = with_defaults(config)
    base_train = {**TRAINING_DEFAULTS, **cfg.get("training", {})}
    base_gen = {**GENERATION_DEFAULTS, **cfg.get("generation", {})}
    runs = []
    for exp_name, exp in cfg["experiments"].items():
        for task in exp["tasks"]:
            tparams = cfg["tasks"][task]
            family = get_task_class(tparams["type"]).family
            for model in exp["models"]:
                for method in exp["methods"]:
                    mentry = cfg["methods"][method]
                    training = {**base_train, **exp.get("training", {}), **mentry.get("training", {})}
                    generation = {**base_gen, **exp.get("generation", {})}
                    mparams = {k: v for k, v in mentry.items() if k != "training"}
                    for seed in exp.get("seeds", [0]):
                        runs.append(
                            RunSpec(
                                experiment=exp_name,
                                family=family,
                                task=task,
                                task_params=copy.deepcopy(tparams),
                                model=model,
                                model_params=copy.deepcopy(cfg["models"][model]),
                                method=method,
                                method_type=mentry["type"],
                                method_params=copy.deepcopy(mparams),
                                seed=int(seed),
                                training=training,
                                generation=generation,
                                scale=cfg.get("scale", "smoke"),
                            )
                        )
    return runs
