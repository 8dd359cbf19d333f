"""The task interface: data loading (Hub or local files), preprocessing and metrics.

A task config entry names a task type and its options, e.g.

    sst2:       {type: glue, subset: sst2}                      # Hub: nyu-mll/glue
    smoke_sst2: {type: glue, subset: sst2, data: smoke_sent}    # generated JSONL, same schema

``data`` refers to a generated smoke dataset (written as JSONL by ``lamda-repro prepare-data``);
``data_files`` gives local files of the Hub schema directly. Either way the splits are read
through ``datasets.load_dataset`` exactly as Hub data is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lamda_repro.schema import ConfigError, check_against_schema

_REGISTRY: dict[str, type["Task"]] = {}

TASK_KINDS = ("seq-cls", "seq2seq", "causal-lm")


class TaskConfigError(ConfigError):
    """A task entry in the config is invalid."""


class DataFileError(ValueError):
    """A local data file cannot be used; the message is one line: '<file>: <problem>'."""


@dataclass(frozen=True)
class HubSource:
    """Where a task's data lives on the Hub: repository, config, revision and the split mapping
    (the suite's split name -> the data set's). ``lamda-repro preflight`` checks exactly this."""

    path: str
    name: str | None
    splits: dict[str, str]
    revision: str | None = None


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
    def required_columns(self) -> tuple[str, ...]:
        """Columns every row of a local data file must have (checked before training)."""
        return ()

    def label_classes(self) -> int | None:
        """Number of classes of the ``label`` column (values 0..n-1); None = not checked."""
        return None

    def hub_source(self) -> HubSource | None:
        """The Hub data set this task reads when it has no local files; None = not a Hub task."""
        return None

    def load_splits(self):
        """Return a datasets.DatasetDict with "train" and "eval" splits (raw columns)."""
        raise NotImplementedError

    def load_hub_splits(self):
        """``load_raw_splits`` of this task's ``hub_source()`` (local files when the task has them)."""
        src = self.hub_source()
        return load_raw_splits(self, src.path, src.name, src.splits, src.revision)

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
            check_data_file(f, task.required_columns(), task.label_classes())
        ext = Path(next(iter(files.values()))).suffix.lstrip(".")
        builder = _BUILDERS.get(ext)
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


_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


def _rows(path: Path, ext: str):
    """(row number, row) of a local data file; DataFileError for what cannot be read."""
    if ext == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001  (pyarrow raises several types for a bad file)
            raise DataFileError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, row
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(
            f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    if ext == "csv":
        import csv
        import io

        yield from enumerate(csv.DictReader(io.StringIO(text)), 2)
        return
    import json

    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        yield from enumerate(rows, 1)
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}: line {i}: not valid JSON ({exc.msg})") from None


def check_data_file(path: str | Path, columns: tuple[str, ...] = (), label_classes: int | None = None) -> int:
    """Check a local data file before training: it exists, has a supported type, is UTF-8 (text
    formats), holds at least one row, every row has ``columns``, and (given ``label_classes``) every
    ``label`` is an integer in 0..label_classes-1. Returns the number of rows; raises DataFileError
    naming the file and the first problem."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: data file not found")
    ext = path.suffix.lstrip(".")
    if ext not in _BUILDERS:
        raise DataFileError(f"{path}: unsupported data file type .{ext} (use {', '.join(sorted(_BUILDERS))})")
    n = 0
    for where, row in _rows(path, ext):
        n += 1
        if not isinstance(row, dict):
            raise DataFileError(
                f"{path}: row {where}: expected an object of columns, got {type(row).__name__}"
            )
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataFileError(f"{path}: row {where}: missing column {missing[0]!r} (has: {', '.join(row)})")
        if label_classes is not None:
            label = row.get("label")
            try:
                value = int(label)
                ok = value == float(label) and 0 <= value < label_classes
            except (TypeError, ValueError):
                ok = False
            if not ok:
                expected = f"expected an integer 0..{label_classes - 1}"
                raise DataFileError(f"{path}: row {where}: label {label!r} out of range ({expected})")
    if n == 0:
        raise DataFileError(f"{path}: empty (no rows)")
    return n
