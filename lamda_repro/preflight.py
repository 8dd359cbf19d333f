"""``lamda-repro preflight <config>``: check every Hub model, data set and task of a config before
any job is submitted, plus the environment the jobs will load them with.

Online, with the user's token (``hf auth login`` or HF_TOKEN): each model's access (gated
repositories named with the licence page to accept), the files its loader needs (config, weights
in safetensors, a tokenizer the installed converters can read), each data set's first streamed
rows (configs, splits, columns; a loading-script-only repository fails as it would in a job), the
lm-eval tasks' data, the corpus; then the codecs, converters, the disk the caches need (from the
Hub's file sizes) and CUDA where the config says ``device: cuda``. One table; exit status 1 when
any item would fail a job, each failure with its fix. ``--download`` also fills the cache under
HF_HOME (on shared storage) so that compute nodes without internet run with the offline switches.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Tokenizer files a model repository may publish, and what transformers needs to read each
# (its own fast tokenizer file needs nothing more; a SentencePiece model is converted with the
# sentencepiece and protobuf packages; GPT-2-style vocab.json + merges.txt with tokenizers alone).
TOKENIZER_FILES = {
    "tokenizer.json": (),
    "vocab.json": (),
    "spm.model": ("sentencepiece", "google.protobuf"),
    "tokenizer.model": ("sentencepiece", "google.protobuf"),
    "sentencepiece.bpe.model": ("sentencepiece", "google.protobuf"),
}
# The pinned install of each module a loader may need (pyproject.toml / environment.yml).
PINNED = {
    "sentencepiece": "sentencepiece==0.2.3",
    "google.protobuf": "protobuf==7.36.2",
    "zstandard": "zstandard==0.25.0",
}
# Data file compressions fsspec decodes through an optional package (Python 3.11 has gzip, bz2, lzma).
CODECS = {".zst": "zstandard", ".lz4": "lz4"}


@dataclass
class Item:
    kind: str  # model | dataset | lm-eval | corpus | environment
    name: str
    ok: bool
    detail: str
    fix: str = ""
    bytes_needed: int = 0
    repo: str = ""  # the repository the bytes belong to (a data set used by several tasks counts once)


class PreflightError(ValueError):
    """The config cannot be checked (one line)."""


# -- what the config names ---------------------------------------------------------------------


def hub_models(config: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(config name, Hub id, revision) of every Hub model the config's runs use."""
    used = {m for exp in config.get("experiments", {}).values() for m in exp.get("models", [])}
    out = []
    for name in sorted(used):
        entry = config["models"][name]
        if entry.get("source") == "hub":
            out.append((name, entry["id"], entry.get("revision")))
    section = config.get("recursive") or {}
    if section.get("enabled", True):
        for name, entry in (section.get("models") or {}).items():
            path = entry.get("path")
            if path and not Path(path).exists() and "/" in path:
                out.append((f"recursive.{name}", path, entry.get("revision")))
    return out


def hub_tasks(config: dict[str, Any]) -> list[tuple[str, Any, tuple[str, ...]]]:
    """(task name, HubSource, required columns) of every Hub task the config's runs use."""
    from lamda_repro.tasks.base import get_task_class

    used = {t for exp in config.get("experiments", {}).values() for t in exp.get("tasks", [])}
    out = []
    for name in sorted(used):
        params = config["tasks"][name]
        if "data" in params or "data_files" in params:
            continue
        task = get_task_class(params["type"])(name, params)
        src = task.hub_source()
        if src is not None:
            out.append((name, src, task.required_columns()))
    return out


def lm_eval_task_data(task_name: str) -> dict[str, Any]:
    """dataset_path / dataset_name / the evaluated split of an lm-eval task, read from the task YAMLs
    installed with lm-eval (without importing it: the YAML is the task's declaration)."""
    import yaml

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PreflightError("lm-eval is not installed (pip install lm-eval==0.4.13)")
    tasks_dir = Path(list(spec.submodule_search_locations)[0]) / "tasks"

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)

    def read(path: Path) -> dict[str, Any]:
        data = yaml.load(path.read_text(), Loader=Loader) or {}
        if "include" in data:
            base = read(path.parent / data["include"])
            base.update({k: v for k, v in data.items() if k != "include"})
            return base
        return data

    for path in tasks_dir.rglob("*.yaml"):
        text = path.read_text(errors="replace")
        if f"task: {task_name}\n" not in text:
            continue
        data = read(path)
        if data.get("task") == task_name:
            split = data.get("test_split") or data.get("validation_split")
            return {"path": data["dataset_path"], "name": data.get("dataset_name"), "split": split}
    raise PreflightError(f"lm-eval has no task {task_name!r}")


# -- checks ------------------------------------------------------------------------------------


def _importable(module: str) -> bool:
    """Whether ``module`` imports here (a broken install counts as missing, as it would in a job)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _missing_modules(modules) -> list[str]:
    return [m for m in modules if not _importable(m)]


def _install_fix(modules) -> str:
    return "pip install " + " ".join(PINNED.get(m, m) for m in modules) + " (both install paths pin them)"


def _login_fix(repo_id: str, repo_type: str = "model") -> str:
    prefix = "" if repo_type == "model" else "datasets/"
    return (
        f"accept the licence at https://huggingface.co/{prefix}{repo_id} with your account, then "
        "`hf auth login` (or export HF_TOKEN=...) on this node"
    )


def check_model(name: str, repo_id: str, revision: str | None, token) -> Item:
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    label = f"{name} = {repo_id}" + (f"@{revision[:12]}" if revision else "")
    api = HfApi(token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        files = {s.rfilename: (s.size or 0) for s in info.siblings or []}
        # The files are what a job downloads: gated repositories answer 401/403 here.
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision), token=token)
    except GatedRepoError:
        why = "no token" if not token else "this token has no access"
        return Item("model", label, False, f"gated repository ({why})", _login_fix(repo_id))
    except RevisionNotFoundError:
        return Item(
            "model", label, False, f"revision {revision} not found", "set a revision the repository has"
        )
    except RepositoryNotFoundError:
        return Item(
            "model", label, False, "repository not found (or private)", "check the id; log in if private"
        )
    if "config.json" not in files:
        return Item("model", label, False, "no config.json", "pick a revision with config.json")
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        has_bin = [f for f in files if f.endswith(".bin")]
        why = f"only {', '.join(sorted(has_bin))} (pickle)" if has_bin else "no weights"
        fix = (
            "set the entry's revision: to a commit with model.safetensors (the Hub's safetensors "
            "conversion pull request, refs/pr/N, where one exists); the suite never unpickles weights"
        )
        return Item("model", label, False, f"no safetensors weights: {why}", fix)
    tokenizer = next((f for f in TOKENIZER_FILES if f in files), None)
    if tokenizer is None:
        return Item(
            "model", label, False, "no tokenizer file", "set models.<name>.tokenizer or pick a revision"
        )
    if tokenizer != "tokenizer.json":
        missing = _missing_modules(TOKENIZER_FILES[tokenizer])
        if missing:
            return Item(
                "model",
                label,
                False,
                f"tokenizer only as {tokenizer}: converting it needs {', '.join(missing)}",
                _install_fix(missing),
            )
    needed = sum(
        size for f, size in files.items() if f in weights or f in TOKENIZER_FILES or f.endswith(".json")
    )
    gated = f", gated ({info.gated}: access granted)" if info.gated else ""
    return Item("model", label, True, f"{len(weights)} safetensors file(s), {tokenizer}{gated}", "", needed)


def _first_row(path: str, name: str | None, split: str, revision: str | None, token):
    from datasets import load_dataset

    stream = load_dataset(path, name, split=split, revision=revision, streaming=True, token=token)
    return next(iter(stream))


def _dataset_files(path: str, revision: str | None, token) -> dict[str, int]:
    from huggingface_hub import HfApi

    info = HfApi(token=token).dataset_info(path, revision=revision, files_metadata=True)
    return {s.rfilename: (s.size or 0) for s in info.siblings or []}


def _dataset_failure(kind: str, label: str, path: str, exc: Exception, files: dict[str, int]) -> Item:
    from huggingface_hub.errors import GatedRepoError

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, GatedRepoError):
        return Item(kind, label, False, "gated data set", _login_fix(path, "dataset"))
    scripts = [f for f in files if f.endswith(".py") and "/" not in f]
    data = [f for f in files if f.endswith((".parquet", ".json", ".jsonl", ".csv", ".arrow", ".zst", ".gz"))]
    if scripts and not data:
        return Item(
            kind,
            label,
            False,
            f"only a loading script ({scripts[0]}); datasets 5 does not run scripts",
            "read the Hub's Parquet export: set hub_revision: refs/convert/parquet on the task",
        )
    return Item(
        kind, label, False, f"{type(exc).__name__}: {text}"[:200], "see the message; check id, config, split"
    )


def _codec_problem(files: dict[str, int]) -> tuple[str, str] | None:
    for suffix, module in CODECS.items():
        if any(f.endswith(suffix) for f in files) and not _importable(module):
            return suffix, module
    return None


def check_dataset(kind: str, label: str, path: str, name, splits, revision, columns, token) -> Item:
    try:
        files = _dataset_files(path, revision, token)
    except Exception as exc:  # noqa: BLE001  (each failure becomes a row of the table)
        return _dataset_failure(kind, label, path, exc, {})
    codec = _codec_problem(files)
    if codec is not None:
        suffix, module = codec
        return Item(
            kind, label, False, f"files are *{suffix}; decoding needs {module}", _install_fix([module])
        )
    seen = {}
    for split in splits:
        try:
            row = _first_row(path, name, split, revision, token)
        except Exception as exc:  # noqa: BLE001
            return _dataset_failure(kind, f"{label} [{split}]", path, exc, files)
        missing = [c for c in columns if c not in row]
        if missing:
            return Item(
                kind,
                f"{label} [{split}]",
                False,
                f"columns {missing} missing (has {sorted(row)})",
                "check the config",
            )
        seen[split] = len(row)
    size = sum(files.values())
    return Item(
        kind, label, True, f"splits {', '.join(seen)}: first rows read", "", size, f"{path}@{revision}"
    )


def environment_items(config: dict[str, Any], needed_bytes: int, cache: Path, cuda: bool) -> list[Item]:
    items = []
    free = shutil.disk_usage(cache if cache.exists() else cache.parent).free
    ok = free >= needed_bytes
    items.append(
        Item(
            "environment",
            f"disk for {cache}",
            ok,
            f"{needed_bytes / 1e9:.1f} GB of Hub files needed, {free / 1e9:.1f} GB free",
            "" if ok else "point HF_HOME at storage with room (shared across nodes)",
        )
    )
    if config.get("device") == "cuda" or (config.get("bench") or {}).get("device") == "cuda":
        if not cuda:
            items.append(Item("environment", "CUDA", True, "not checked (--no-cuda-check)"))
        else:
            import torch

            built = torch.backends.cuda.is_built()
            visible = torch.cuda.is_available()
            detail = f"torch {torch.__version__}: CUDA build {built}, GPU visible here {visible}"
            items.append(
                Item(
                    "environment",
                    "CUDA",
                    built,
                    detail,
                    "" if built else "install the CUDA build of torch (environment.yml)",
                )
            )
    return items


def run_preflight(config: dict[str, Any], token=None, cuda_check: bool = True) -> list[Item]:
    items: list[Item] = []
    for name, repo_id, revision in hub_models(config):
        items.append(check_model(name, repo_id, revision, token))
    for name, src, columns in hub_tasks(config):
        label = (
            f"{name} = {src.path}"
            + (f"/{src.name}" if src.name else "")
            + (f"@{src.revision}" if src.revision else "")
        )
        splits = list(dict.fromkeys(src.splits.values()))
        items.append(
            check_dataset("dataset", label, src.path, src.name, splits, src.revision, columns, token)
        )
    section = config.get("recursive") or {}
    if section.get("enabled", True) and section:
        corpus = section.get("corpus") or {}
        if corpus.get("kind") == "hub":
            splits = list(dict.fromkeys((corpus.get("splits") or {"train": "train"}).values()))
            field = corpus.get("text_field", "text")
            item = check_dataset(
                "corpus", corpus["name"], corpus["name"], corpus.get("subset"), splits, None, (field,), token
            )
            item.bytes_needed = 0  # streamed, never cached whole
            items.append(item)
        for task_name in (section.get("eval") or {}).get("tasks", []):
            try:
                data = lm_eval_task_data(task_name)
            except PreflightError as exc:
                items.append(Item("lm-eval", task_name, False, str(exc), "check recursive.eval.tasks"))
                continue
            label = f"{task_name} = {data['path']}" + (f"/{data['name']}" if data["name"] else "")
            items.append(
                check_dataset("lm-eval", label, data["path"], data["name"], [data["split"]], None, (), token)
            )
    needed = sum({(i.repo or i.name): i.bytes_needed for i in items}.values())
    cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    items.extend(environment_items(config, needed, cache, cuda_check))
    return items


def format_table(items: list[Item]) -> str:
    rows = [("", "kind", "item", "detail / fix")]
    for i in items:
        note = i.detail if i.ok else f"{i.detail} -> FIX: {i.fix}"
        rows.append(("OK" if i.ok else "FAIL", i.kind, i.name, note))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {d}" for a, b, c, d in rows)


def download(config: dict[str, Any], token=None) -> None:
    """Fill HF_HOME with what the config's jobs load: model files (safetensors, config, tokenizer) and
    each data set / lm-eval task data set in the form datasets caches it."""
    from datasets import load_dataset
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    for _, repo_id, revision in hub_models(config):
        snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
    for _, src, _ in hub_tasks(config):
        load_dataset(src.path, src.name, revision=src.revision, token=token)
    section = config.get("recursive") or {}
    for task_name in (section.get("eval") or {}).get("tasks", []):
        data = lm_eval_task_data(task_name)
        load_dataset(data["path"], data["name"], token=token)


def add_cli(sub) -> None:
    s = sub.add_parser(
        "preflight", help="check a config's Hub models, data and environment before submitting"
    )
    s.add_argument("configs", nargs="+", help="config file(s), later ones override earlier ones")
    s.add_argument(
        "--download", action="store_true", help="then fill the HF_HOME cache for offline compute nodes"
    )
    s.add_argument(
        "--no-cuda-check",
        action="store_true",
        help="skip the CUDA-build check (a machine that only submits, with a CPU build of torch)",
    )
    s.set_defaults(func=_cmd_preflight)


def _cmd_preflight(args) -> int:
    from huggingface_hub import get_token

    from lamda_repro.config import load_config

    for noisy in ("httpx", "httpx2", "huggingface_hub", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = load_config(*args.configs)
    if config.get("offline"):
        print(f"preflight: {args.configs[-1]} is offline (offline: true); nothing on the Hub to check")
        return 0
    token = get_token()
    items = run_preflight(config, token=token, cuda_check=not args.no_cuda_check)
    print(format_table(items))
    failed = [i for i in items if not i.ok]
    print(
        f"\npreflight: {len(items) - len(failed)} OK, {len(failed)} FAIL"
        + ("" if token else " (no Hub token)")
    )
    if failed:
        return 1
    if args.download:
        download(config, token=token)
        print(f"preflight: cache filled under {os.environ.get('HF_HOME', '~/.cache/huggingface')}")
    sys.stdout.flush()
    return 0
