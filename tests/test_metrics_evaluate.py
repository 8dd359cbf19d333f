"""Every metric of the suite is computed through ``evaluate.load`` on the modules shipped in the
package; E2E's official set (BLEU, NIST, METEOR, ROUGE-L, CIDEr); METEOR without Java."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tasks_families import (
    E2E_ROWS,
    GSM_ROWS,
    WIKI_ROWS,
    XSUM_ROWS,
    texts_of,
    tiny_gpt2,
    word_tokenizer,
    write_split_files,
)

from lamda_repro.tasks import metrics
from lamda_repro.tasks.base import get_task_class


@pytest.fixture
def evaluate_calls(monkeypatch):
    """Record every ``evaluate.load`` (module file) and what its ``compute`` returned."""
    import evaluate

    calls: list[tuple[Path, dict]] = []
    real_load = evaluate.load

    def load(path, *args, **kwargs):
        module = real_load(path, *args, **kwargs)
        real_compute = module.compute

        def compute(**inputs):
            out = real_compute(**inputs)
            calls.append((Path(path), out))
            return out

        module.compute = compute
        return module

    monkeypatch.setattr(evaluate, "load", load)
    return calls


def no_java(monkeypatch, tmp_path):
    """A PATH without a java executable."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))


def from_evaluate(calls, name: str) -> dict:
    """The output of the one compute() of metric module ``name``."""
    outs = [out for path, out in calls if path.stem == name]
    assert len(outs) == 1, f"{name}: {len(outs)} evaluate computations"
    return outs[0]


def test_every_metric_module_is_an_evaluate_module_in_the_package(evaluate_calls):
    names = sorted(p.stem for p in metrics.METRIC_MODULES.glob("*.py") if p.stem != "__init__")
    assert names == ["bleu", "cider", "exact_match", "glue", "meteor", "nist", "perplexity", "rouge"]
    assert metrics.bleu_score(["the cat sat down"], ["the cat sat down"]) == pytest.approx(100.0)
    ((path, _),) = evaluate_calls
    assert path == metrics.METRIC_MODULES / "bleu.py" and path.is_relative_to(Path(metrics.__file__).parent)
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        metrics.load("accuracy")


def test_e2e_evaluator_computes_the_official_set_through_evaluate(tmp_path, monkeypatch, evaluate_calls):
    no_java(monkeypatch, tmp_path)
    e2e = get_task_class("e2e_nlg")(
        "e", {}, write_split_files(tmp_path, {"train": E2E_ROWS, "validation": E2E_ROWS})
    )
    raw = e2e.load_splits()
    tok = word_tokenizer(list(texts_of(E2E_ROWS)) + ["||"])
    out = e2e.evaluate(tiny_gpt2(len(tok)), tok, raw["eval"], None, 2, {"max_new_tokens": 5})
    assert out["bleu"] == from_evaluate(evaluate_calls, "bleu")["bleu"]
    assert out["nist"] == from_evaluate(evaluate_calls, "nist")["nist"]
    assert out["rougeL"] == from_evaluate(evaluate_calls, "rouge")["rougeL"]
    assert out["cider"] == from_evaluate(evaluate_calls, "cider")["cider"]
    assert out["meteor"] == metrics.Unavailable("no Java")
    assert sorted(out) == ["bleu", "cider", "meteor", "nist", "num_mrs", "rougeL"]
    assert get_task_class("e2e_nlg").table_metrics == ("bleu", "nist", "meteor", "rougeL", "cider")


def test_gsm8k_wikitext_and_summarization_evaluators_compute_through_evaluate(tmp_path, evaluate_calls):
    from transformers import BartConfig, BartForConditionalGeneration

    tok = word_tokenizer(list(texts_of(GSM_ROWS + WIKI_ROWS)) + ["question : answer :"])
    model = tiny_gpt2(len(tok))
    (tmp_path / "g").mkdir()
    gsm = get_task_class("gsm8k")(
        "g", {}, write_split_files(tmp_path / "g", {"train": GSM_ROWS, "test": GSM_ROWS})
    )
    out = gsm.evaluate(model, tok, gsm.load_splits()["eval"], None, 2, {"max_new_tokens": 3})
    assert out["exact_match"] == from_evaluate(evaluate_calls, "exact_match")["exact_match"]

    (tmp_path / "w").mkdir()
    wiki = get_task_class("wikitext")(
        "w", {}, write_split_files(tmp_path / "w", {"train": WIKI_ROWS, "test": WIKI_ROWS})
    )
    raw = wiki.load_splits()["eval"]
    out = wiki.evaluate(model, tok, raw, wiki.tokenize(raw, tok, 4), 2)
    assert out["perplexity"] == from_evaluate(evaluate_calls, "perplexity")["perplexity"]

    (tmp_path / "x").mkdir()
    xsum = get_task_class("xsum")(
        "x", {}, write_split_files(tmp_path / "x", {"train": XSUM_ROWS, "validation": XSUM_ROWS[:2]})
    )
    raw = xsum.load_splits()["eval"]
    btok = word_tokenizer(texts_of(XSUM_ROWS), "bart")
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=len(btok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=64,
            pad_token_id=btok.pad_token_id, bos_token_id=btok.bos_token_id, eos_token_id=btok.eos_token_id,
            decoder_start_token_id=btok.bos_token_id,
        )
    ).eval()  # fmt: skip
    out = xsum.evaluate(bart, btok, raw, xsum.tokenize(raw, btok, 16), 2, {"max_new_tokens": 3})
    rouge = from_evaluate(evaluate_calls, "rouge")
    assert all(out[k] == rouge[k] for k in metrics.ROUGE_TYPES)


def test_glue_evaluator_computes_through_evaluate(tmp_path, evaluate_calls):
    from transformers import BertConfig, BertForSequenceClassification

    rows = [
        {"sentence1": f"it is {w} .", "sentence2": f"{w} it is .", "label": i % 2, "idx": i}
        for i, w in enumerate("abcdef")
    ]
    files = {}
    for split in ("train", "validation"):
        files[split] = str(tmp_path / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task_class("glue")("mrpc", {"subset": "mrpc"}, files)
    raw = task.load_splits()["eval"]
    tok = word_tokenizer(texts_of(rows), "bert")
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=16, max_position_embeddings=32, num_labels=2)
    ).eval()  # fmt: skip
    out = task.evaluate(model, tok, raw, task.tokenize(raw, tok, 16), 4)
    assert out == from_evaluate(evaluate_calls, "glue") and set(out) == {"accuracy", "f1"}


def test_cider_matches_hand_values():
    # Two examples, each prediction equal to its only reference, no n-gram shared between them:
    # every n-gram has document frequency 1 of 2, so TF-IDF vectors of prediction and reference
    # coincide and each order with n-grams scores cosine 1. CIDEr-D = 10 x mean over n = 1..4.
    four = metrics.cider_score(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]])
    assert four == pytest.approx(10.0)
    two = metrics.cider_score(["a b", "c d"], [["a b"], ["c d"]])  # only orders 1 and 2 exist
    assert two == pytest.approx(5.0)
    # lowercased 13a tokens: case does not matter, punctuation is a token of its own
    assert metrics.cider_score(["A B", "C d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    assert metrics.cider_score(["a b.", "c d"], [["a b ."], ["c d"]]) == pytest.approx((7.5 + 5.0) / 2)
    assert metrics.cider_score(["x y", "c d"], [["a b"], ["c d"]]) == pytest.approx(2.5)


def test_meteor_without_java_is_unavailable_not_a_number(tmp_path, monkeypatch, evaluate_calls):
    no_java(monkeypatch, tmp_path)
    assert metrics.meteor_score(["the cat"], [["the cat"]]) == metrics.Unavailable("no Java")
    assert evaluate_calls == []  # no Java process was attempted
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        metrics.meteor_score(["a"], ["a", "b"])


@pytest.mark.slow
@pytest.mark.skipif(not metrics.java_available(), reason="METEOR needs a Java runtime (none on PATH)")
def test_meteor_through_the_java_scorer(evaluate_calls):
    preds = ["The eagle is a pub near the river.", "zizzi is cheap"]
    refs = [["the eagle is a french pub near the river ."], ["zizzi is cheap", "zizzi is a cheap place"]]
    score = metrics.meteor_score(preds, refs)  # one Java process: it loads for several seconds
    assert score == from_evaluate(evaluate_calls, "meteor")["meteor"]
    # METEOR 1.5 (en, -norm) of these lowercased 13a tokens, as the Java scorer computes it
    assert score == pytest.approx(52.49299, abs=1e-4)


WORDS = st.lists(
    st.sampled_from("the eagle pub river zizzi cheap food near serves french".split()), min_size=4
)


@settings(max_examples=25, deadline=None)
@given(WORDS)
def test_identical_output_scores_full_bleu_and_rouge(words):
    text = " ".join(words)
    assert metrics.bleu_score([text], [text]) == pytest.approx(100.0)
    assert metrics.rouge_scores([text], [text], ("rouge1", "rougeL")) == pytest.approx(
        {"rouge1": 100.0, "rougeL": 100.0}
    )


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_exact_match_ignores_number_formatting(n):
    assert metrics.gsm8k_exact_match([f"so {n:,}.00 in total"], [f"#### {n}"]) == 1.0
    assert metrics.gsm8k_exact_match([f"#### {n + 1}"], [f"#### {n}"]) == 0.0
