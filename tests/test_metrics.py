"""Offline metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from lamda_repro.tasks import metrics


def test_rouge_matches_hand_counts():
    # pred: the cat sat on the mat / ref: the cat sat on a mat
    # unigrams: 5 of 6 match both ways -> F = 5/6; bigrams: 3 of 5 -> F = 0.6;
    # LCS = the cat sat on mat (5) -> F = 5/6
    scores = metrics.rouge_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(60.0)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)


def test_rouge_is_the_mean_of_per_example_scores_and_deterministic():
    preds = ["the cat sat", "a dog barked loudly", "nothing in common"]
    refs = ["the cat sat", "the dog barked", "completely different words"]
    each = [metrics.rouge_scores([p], [r])["rouge1"] for p, r in zip(preds, refs, strict=True)]
    first = metrics.rouge_scores(preds, refs)
    assert first["rouge1"] == pytest.approx(sum(each) / 3)
    assert all(metrics.rouge_scores(preds, refs) == first for _ in range(3))


def test_rouge_uses_the_stemmer():
    assert metrics.rouge_scores(["cats running"], ["cat runs"], ("rouge1",))["rouge1"] == pytest.approx(100.0)


def test_rouge_with_several_references_takes_the_best():
    scores = metrics.rouge_scores(["the eagle is a pub"], [["zizzi is cheap", "the eagle is a pub"]])
    assert scores["rougeL"] == pytest.approx(100.0)


def test_rouge_lsum_splits_sentences():
    assert metrics.split_sentences("It rained. Then 3 cats ran! Done") == [
        "It rained.",
        "Then 3 cats ran!",
        "Done",
    ]
    scores = metrics.rouge_scores(["Bob cooks. Ann"], ["Ann. Bob cooks"], ("rougeL", "rougeLsum"))
    assert scores["rougeLsum"] == pytest.approx(100.0) and scores["rougeL"] == pytest.approx(200 / 3)


def test_bleu_on_known_pairs():
    assert metrics.bleu_score(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # Hand computation: hyp "the cat sat on the mat", ref "the cat sat on a mat" (13a tokens).
    # p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3; brevity penalty 1 (equal lengths).
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu_score(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        expected, rel=1e-6
    )


def test_bleu_accepts_a_different_number_of_references_per_example():
    preds = ["the eagle is a pub", "zizzi is cheap"]
    refs = [["the eagle is a pub", "a pub called the eagle"], ["zizzi is cheap"]]
    assert metrics.bleu_score(preds, refs) == pytest.approx(100.0)


def test_nist_rewards_exact_output():
    refs = [["the eagle is a french pub near the river ."]]
    good = metrics.nist_score(["the eagle is a french pub near the river ."], refs)
    bad = metrics.nist_score(["zizzi serves food"], refs)
    assert good > bad >= 0.0


def test_metrics_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.bleu_score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.rouge_scores([], [])


def test_perplexity_of_a_known_loss():
    assert metrics.perplexity(total_nll=10 * math.log(7), n_tokens=10) == pytest.approx(7.0)
    assert metrics.perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)


@pytest.mark.parametrize(
    "text, number",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("#### 1,200", "1200"),
        ("#### 1,200.00", "1200"),
        ("#### -3", "-3"),
        ("#### 0.50", "0.5"),
        ("She pays $18 every day. The answer is 18.", "18"),
        ("3 apples and 4 pears #### 7 and more text 9", "7"),
        ("first #### 5 then #### 6", "6"),
        ("no digits here", None),
        ("#### nothing after the marker", None),
    ],
)
def test_gsm8k_extraction(text, number):
    assert metrics.extract_final_number(text) == number


def test_gsm8k_exact_match_compares_numbers():
    preds = ["so the total is 1200.0", "#### 5", "I do not know", "#### 1,000"]
    refs = ["#### 1,200", "#### 6", "#### 3", "#### 1000"]
    assert metrics.gsm8k_exact_match(preds, refs) == pytest.approx(0.5)


def test_gsm8k_reference_without_number_is_an_error():
    with pytest.raises(ValueError, match="no final number"):
        metrics.gsm8k_exact_match(["#### 1"], ["no answer"])
