"""Offline metrics for the generation-style task families.

Everything here is a pure function of strings or numbers, so results are deterministic and
can be pinned in tests:

- ROUGE (rouge-score, Porter stemmer): the mean over examples of each example's F-measure.
  ``evaluate``'s ROUGE defaults to a random bootstrap aggregate; averaging per-example scores
  gives the same point estimate without randomness.
- BLEU: sacrebleu corpus BLEU (13a tokenization, exp smoothing), with any number of
  references per hypothesis.
- NIST: nltk's corpus NIST (n = 5) on lowercased 13a tokens, as an offline stand-in for the
  E2E challenge's mteval script.
- Perplexity: ``exp(total negative log-likelihood / predicted tokens)``.
- GSM8K: final-number extraction and numeric exact match.

Scales: ROUGE and BLEU are reported on 0-100 (the scale summarization and E2E papers use),
NIST on its own scale, exact match on 0-1 like accuracy.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Iterable, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Sentence boundaries for rougeLsum, which scores the union LCS over newline-separated
# sentences. A rule instead of nltk's punkt model, whose data files are not shipped offline.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at '.', '!' or '?' followed by whitespace and a capital/digit."""
    parts = []
    for line in text.strip().splitlines():
        parts.extend(p.strip() for p in _SENTENCE_END.split(line) if p.strip())
    return parts


def _check_pairs(predictions: Sequence, references: Sequence, what: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError(f"{what}: no predictions to score")


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    rouge_types: Iterable[str] = ROUGE_TYPES,
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean per-example ROUGE F-measure (0-100) for each type in ``rouge_types``.

    A reference may be a string or a list of strings; with several references an example
    scores its best reference (rouge-score's ``score_multi``). For rougeLsum, predictions
    and references are split into sentences first.
    """
    from rouge_score import rouge_scorer

    rouge_types = tuple(rouge_types)
    unknown = [t for t in rouge_types if t not in ROUGE_TYPES]
    if unknown:
        raise ValueError(f"unknown ROUGE type(s) {unknown}; known: {list(ROUGE_TYPES)}")
    _check_pairs(predictions, references, "rouge_scores")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(rouge_types, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        refs = [reference] if isinstance(reference, str) else list(reference)
        if not refs:
            raise ValueError("rouge_scores: an example has no reference")
        if "rougeLsum" in rouge_types:
            prediction = "\n".join(split_sentences(prediction))
            refs = ["\n".join(split_sentences(r)) for r in refs]
        scores = scorer.score_multi(refs, prediction)
        for rouge_type in rouge_types:
            totals[rouge_type] += scores[rouge_type].fmeasure
    n = len(predictions)
    return {t: 100.0 * totals[t] / n for t in rouge_types}


def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str | None]]:
    """Turn per-example reference lists into sacrebleu's reference streams (None = missing)."""
    per_example = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(len(refs) == 0 for refs in per_example):
        raise ValueError("an example has no reference")
    width = max(len(refs) for refs in per_example)
    return [[refs[i] if i < len(refs) else None for refs in per_example] for i in range(width)]


def bleu_score(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0-100); each example may have a different number of references."""
    import sacrebleu

    _check_pairs(predictions, references, "bleu_score")
    result = sacrebleu.corpus_bleu(list(predictions), _reference_streams(references))
    return float(result.score)


def nist_score(predictions: Sequence[str], references: Sequence[str | Sequence[str]], n: int = 5) -> float:
    """Corpus NIST (nltk) on lowercased sacrebleu-13a tokens."""
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    _check_pairs(predictions, references, "nist_score")
    tokenize = Tokenizer13a()

    def tokens(text: str) -> list[str]:
        return tokenize(text.lower()).split()

    hyps = [tokens(p) for p in predictions]
    refs = [[tokens(r)] if isinstance(r, str) else [tokens(x) for x in r] for r in references]
    longest = max(len(h) for h in hyps)
    if longest == 0:
        return 0.0
    # nltk divides by the number of hypothesis n-grams of each order; orders no hypothesis
    # reaches contribute nothing (as in mteval), which capping n expresses.
    return float(corpus_nist(refs, hyps, n=min(n, longest)))


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood per predicted token."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs at least one predicted token, got {n_tokens}")
    if not math.isfinite(total_nll):
        raise ValueError(f"perplexity: total negative log-likelihood is {total_nll}")
    return math.exp(total_nll / n_tokens)


# A number with optional sign, thousands separators ("1,234") and decimals.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
GSM8K_ANSWER_MARKER = "####"


def extract_final_number(text: str) -> str | None:
    """The answer number of a GSM8K-style solution, normalized, or None if there is none.

    Rule: if the text contains "####", the first number after the last "####";
    otherwise the last number in the text. Thousands separators are removed, a trailing
    ".0..." is dropped and "-0" becomes "0", so "1,200.00" -> "1200".
    """
    if GSM8K_ANSWER_MARKER in text:
        tail = text.rsplit(GSM8K_ANSWER_MARKER, 1)[1]
        match = _NUMBER.search(tail)
        found = match.group(0) if match else None
    else:
        matches = _NUMBER.findall(text)
        found = matches[-1] if matches else None
    if found is None:
        return None
    return normalize_number(found)


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of a number ("1,200.50" -> "1200.5"), or None if not a number."""
    try:
        value = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        value = value.quantize(Decimal(1))
    else:
        value = value.normalize()
    if value == 0:
        value = Decimal(0)
    return format(value, "f")


def gsm8k_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0-1) of predictions whose extracted final number equals the reference's."""
    _check_pairs(predictions, references, "gsm8k_exact_match")
    hits = 0
    for prediction, reference in zip(predictions, references, strict=True):
        gold = extract_final_number(reference)
        if gold is None:
            raise ValueError(f"reference has no final number: {reference[-80:]!r}")
        hits += int(extract_final_number(prediction) == gold)
    return hits / len(predictions)
