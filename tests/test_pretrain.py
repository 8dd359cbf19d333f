"""The shared pretraining stage: the general corpus, the two objectives, bit-reproducible
checkpoints, and the smoke config's fine-tuning and recursive runs starting from them."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lamda_repro.config import ConfigError, expand_runs, validate_config
from lamda_repro.pretrain import PretrainError, infill, pretrain_settings
from lamda_repro.tasks.smoke import generate, write_dataset

REPO = Path(__file__).resolve().parents[1]
PRETRAINED_FAMILIES = {"summarization", "e2e", "wikitext", "gsm8k"}


def _smoke_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+|[^\w\s]+", text.lower()))  # the tokenizers' pre-tokenization


def _task_rows(entry: dict) -> dict:
    n_train, n_eval = entry["n_train"], entry["n_eval"]
    return generate(entry["generator"], n_train, n_eval, entry["seed"], entry.get("options"))


def tiny_entry(model_type: str) -> dict:
    configs = {
        "bart": {
            "model_type": "bart",
            "d_model": 16,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "decoder_ffn_dim": 32,
            "max_position_embeddings": 64,
        },
        "llama": {
            "model_type": "llama",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 64,
        },
    }
    return {
        "source": "build",
        "seed": 3,
        "tokenizer": {"data": "general"},
        "config": configs[model_type],
        "pretrain": {"steps": 4, "batch_size": 4, "seq_len": 32, "warmup_steps": 1},
    }


# -- the general corpus -----------------------------------------------------------------------


def test_general_corpus_is_deterministic_and_covers_every_word_of_the_smoke_tasks():
    corpus = generate("general_corpus", 2000, 100, 0)
    assert corpus == generate("general_corpus", 2000, 100, 0)
    assert corpus != generate("general_corpus", 2000, 100, 1)
    vocab = set().union(*(_words(r["text"]) for r in corpus["train"]))
    cfg = _smoke_config()
    for name in ("news", "restaurants", "wiki", "arithmetic"):
        entry = cfg["data"][name]
        rows = _task_rows(entry)
        seen = set()
        for split in rows.values():
            for row in split:
                seen |= set().union(*(_words(v) for k, v in row.items() if isinstance(v, str) and k != "id"))
        assert not seen - vocab, (name, sorted(seen - vocab))


def test_general_corpus_holds_no_task_example():
    text = " ".join(r["text"] for r in generate("general_corpus", 2000, 100, 0)["train"])
    cfg = _smoke_config()
    targets = {
        "news": "summary",
        "restaurants": "human_reference",
        "arithmetic": "question",
    }
    for name, field in targets.items():
        entry = cfg["data"][name]
        rows = _task_rows(entry)
        examples = {row[field] for split in rows.values() for row in split}
        assert not [e for e in examples if e in text], name


# -- objectives and settings --------------------------------------------------------------------


def test_infill_masks_spans_keeps_ends_and_reaches_the_ratio():
    rng = random.Random(0)
    ids = [1] + list(range(10, 60)) + [2]
    out = infill(ids, mask_id=99, ratio=0.3, mean_span=3.0, rng=rng)
    assert out[0] == 1 and out[-1] == 2
    kept = [t for t in out[1:-1] if t != 99]
    assert kept == sorted(kept) and len(kept) == 50 - 15  # 30 % of the 50 body tokens masked
    assert "99 99" not in " ".join(map(str, out))  # each span is one mask token
    assert infill(ids, 99, 0.3, 3.0, random.Random(0)) == out


def test_pretrain_settings_resolve_the_objective_and_refuse_bad_values():
    assert pretrain_settings({}, encoder_decoder=True)["objective"] == "denoising"
    assert pretrain_settings({}, encoder_decoder=False)["objective"] == "causal_lm"
    with pytest.raises(PretrainError, match=r"pretrain\.steps"):
        pretrain_settings({"steps": 0}, False)
    with pytest.raises(PretrainError, match="unknown keys"):
        pretrain_settings({"epochs": 2}, False)


def test_config_refuses_pretraining_a_model_that_is_not_built():
    cfg = _smoke_config()
    cfg["models"]["minilm"]["pretrain"] = {"steps": 10}
    with pytest.raises(ConfigError, match=r"models\.minilm\.pretrain: only applies to source 'build'"):
        validate_config(cfg)
    cfg = _smoke_config()
    cfg["models"]["tiny_gpt2"]["pretrain"]["mask_ratio"] = 0.0
    with pytest.raises(ConfigError, match=r"models\.tiny_gpt2\.pretrain"):
        validate_config(cfg)


# -- the smoke config ---------------------------------------------------------------------------


def test_smoke_fine_tuning_and_recursive_runs_start_from_the_pretrained_checkpoints():
    from lamda_repro.recursive.runner import base_artifacts, base_model_path, resolve_section

    cfg = validate_config(_smoke_config())
    general = [n for n, d in cfg["data"].items() if d["generator"] == "general_corpus"]
    assert general == ["general"]
    task_data = {t.get("data") for t in cfg["tasks"].values()}
    assert "general" not in task_data
    runs = [s for s in expand_runs(cfg) if s.experiment in PRETRAINED_FAMILIES]
    assert {s.experiment for s in runs} == PRETRAINED_FAMILIES
    for spec in runs:
        entry = cfg["models"][spec.model]
        assert entry["source"] == "build" and entry["pretrain"]["steps"] > 0, spec.run_id
        assert entry["tokenizer"]["data"] == "general", spec.run_id
    section = resolve_section(cfg["recursive"])
    assert section["corpus"]["data"] == "general"
    for name, entry in section["models"].items():
        shared = cfg["models"][entry["model"]]
        assert shared["source"] == "build" and shared["pretrain"]["steps"] > 0
        assert base_model_path(section, name, "work") == f"work/models/{entry['model']}"
        assert base_artifacts(section, name, "work") == [f"work/models/{entry['model']}/config.json"]


# -- bit-reproducible checkpoints -----------------------------------------------------------------

BUILD = """
import json, sys
from lamda_repro.models import build_model
workdir, files, entries = sys.argv[1], sys.argv[2:4], json.loads(sys.argv[4])
for name, entry in entries.items():
    build_model(name, entry, workdir, files, threads=1)
"""


@pytest.mark.slow  # two fresh interpreters importing torch / transformers: seconds each
def test_two_pretraining_runs_in_fresh_processes_give_identical_weights(tmp_path):
    from safetensors.torch import load_file

    data = tmp_path / "data" / "general"
    write_dataset({"generator": "general_corpus", "n_train": 40, "n_eval": 4, "seed": 0}, data)
    files = [str(data / "train.jsonl"), str(data / "validation.jsonl")]
    entries = {"bart": tiny_entry("bart"), "llama": tiny_entry("llama")}
    for run in ("a", "b"):
        proc = subprocess.run(
            [sys.executable, "-c", BUILD, str(tmp_path / run), *files, json.dumps(entries)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in entries:
        a, b = (tmp_path / run / "models" / name for run in ("a", "b"))
        stats = json.loads((a / "pretrain.json").read_text())["stats"]
        assert stats["steps"] == 4 and stats["objective"] == ("denoising" if name == "bart" else "causal_lm")
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys()
        assert all(wa[k].equal(wb[k]) for k in wa), name
        assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # the pretraining changed the weights: a model built without it differs
    from lamda_repro.models import build_model

    plain = {k: v for k, v in entries["llama"].items() if k != "pretrain"}
    build_model("plain", plain, str(tmp_path / "c"), files, threads=1)
    wc = load_file(tmp_path / "c" / "models" / "plain" / "model.safetensors")
    wa = load_file(tmp_path / "a" / "models" / "llama" / "model.safetensors")
    assert any(not wa[k].equal(wc[k]) for k in wa)
