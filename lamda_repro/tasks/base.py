"""The task interface: data loading (Hub or local files), preprocessing and metrics.

A task config entry names a task type and its options, e.g.

    sst2:       {type: glue, subset: sst2}                      # Hub: nyu-mll/glue
    smoke_sst2: {type: glue, subset: sst2, data: smoke_sent}    # generated JSONL, same schema

``data`` refers to a generated smoke dataset (written as JSONL by ``lamda-repro prepare-data``);
``data_files`` gives local files of the Hub schema directly. Either way the splits are read
through ``datasets.load_dataset`` exactly as Hub data is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from lamda_repro.schema import ConfigError, check_against_schema

_REGISTRY: dict[str, type["Task"]] = {}

TASK_KINDS = ("seq-cls", "seq2seq", "causal-lm")


class TaskConfigError(ConfigError):
    """A task entry in the config is invalid."""


class Task:
    """Base class of a task family member. Subclasses set the class attributes below."""

    type_name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # "nlu" | "summarization" | "generation" | "reasoning"
    task_kind: ClassVar[str] = ""  # one of TASK_KINDS: decides the model head
    params_schema: ClassVar[dict[str, Any]] = {}
    required_params: ClassVar[tuple[str, ...]] = ()
    # Metrics the family table shows for this task, in order; empty = the primary metric only.
    table_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, params: dict[str, Any], data_files: dict[str, str] | None = None):
        self.name = name
        self.params = dict(params)
        # split name ("train", "validation", ...) -> local file; None = load from the Hub
        self.data_files = data_files

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str) -> None:
        schema = {
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "data": {"type": "string"},
                "data_files": {"type": "object", "additionalProperties": {"type": "string"}},
                "max_train_samples": {"type": "integer", "minimum": 1},
                "max_eval_samples": {"type": "integer", "minimum": 1},
                **cls.params_schema,
            },
            "required": list(cls.required_params),
            "additionalProperties": False,
        }
        check_against_schema(params, schema, where)

    # -- what the model needs --------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        """Output size of a classification / regression head (seq-cls tasks only)."""
        raise NotImplementedError

    @property
    def primary_metric(self) -> str:
        raise NotImplementedError

    # -- data ------------------------------------------------------------------------------
    def load_splits(self):
        """Return a datasets.DatasetDict with "train" and "eval" splits (raw columns)."""
        raise NotImplementedError

    def tokenize(self, dataset, tokenizer, max_length: int):
        """Map raw examples to model inputs (input_ids, attention_mask, labels)."""
        raise NotImplementedError

    def data_collator(self, tokenizer, model=None):
        """Collator for the trainer; default pads dynamically."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(
        self,
        model,
        tokenizer,
        eval_raw,
        eval_tokenized,
        batch_size: int,
        generation: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Compute the task's metrics on the eval split: name -> number, or
        ``metrics.Unavailable(reason)`` for a metric this machine cannot compute."""
        raise NotImplementedError


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.type_name:
        raise ValueError(f"{cls.__name__} has no type_name")
    if cls.task_kind not in TASK_KINDS:
        raise ValueError(f"{cls.__name__}.task_kind must be one of {TASK_KINDS}")
    _REGISTRY[cls.type_name] = cls
    return cls


def _import_builtin_tasks() -> None:
    import importlib
    import pkgutil

    import lamda_repro.tasks as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base",):
            importlib.import_module(f"lamda_repro.tasks.{mod.name}")


def task_types() -> list[str]:
    _import_builtin_tasks()
    return sorted(_REGISTRY)


def get_task_class(type_name: str) -> type[Task]:
    _import_builtin_tasks()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise TaskConfigError(
            f"unknown task type {type_name!r} (known: {', '.join(sorted(_REGISTRY))})"
        ) from None


def load_raw_splits(
    task: Task, hub_path: str, hub_name: str | None, splits: dict[str, str], revision: str | None = None
):
    """Load the named splits from local files (if the task has them) or from the Hub.

    ``splits`` maps the suite's split names ("train", "eval", ...) to the data set's split
    names ("train", "validation", ...). Local files are read with the loader their
    extension implies (json/jsonl, csv, parquet); either way ``datasets.load_dataset``
    reads them. ``revision`` picks a Hub revision (e.g. ``refs/convert/parquet`` for data sets
    that ship a loading script). ``max_train_samples`` / ``max_eval_samples`` keep the first n rows.
    """
    import datasets

    if task.data_files is not None:
        missing = [s for s in splits.values() if s not in task.data_files]
        if missing:
            raise FileNotFoundError(f"task {task.name!r}: no local file for split(s) {missing}")
        files = {s: task.data_files[s] for s in splits.values()}
        for f in files.values():
            if not Path(f).exists():
                raise FileNotFoundError(f"task {task.name!r}: data file not found: {f}")
        ext = Path(next(iter(files.values()))).suffix.lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ValueError(f"task {task.name!r}: unsupported data file type .{ext}")
        raw = datasets.load_dataset(builder, data_files=files)
    else:
        raw = datasets.load_dataset(hub_path, hub_name, revision=revision)
    out = datasets.DatasetDict()
    for ours, theirs in splits.items():
        if theirs not in raw:
            raise TaskConfigError(
                f"task {task.name!r}: split {theirs!r} not in {hub_path} (has {sorted(raw)})"
            )
        ds = raw[theirs]
        limit = task.params.get("max_train_samples" if ours == "train" else "max_eval_samples")
        if limit is not None and len(ds) > limit:
            ds = ds.select(range(limit))
        out[ours] = ds
    return out
