"""The suite's metrics, computed through the ``evaluate`` interface.

Every metric is an ``evaluate.Metric`` module shipped in ``lamda_repro/tasks/metric_modules/``
and loaded with ``evaluate.load(<path>)``, offline (the Hub's metric scripts are not used);
each module calls the maintained scorer. The functions here check their inputs (one-line
errors), load the module and return plain numbers:

- ROUGE (rouge-score, Porter stemmer): the mean over examples of each example's F-measure.
  ``evaluate``'s Hub ROUGE defaults to a random bootstrap aggregate; averaging per-example
  scores gives the same point estimate without randomness.
- BLEU: sacrebleu corpus BLEU (13a tokenization, exp smoothing), with any number of
  references per hypothesis.
- NIST: nltk's corpus NIST (n = 5) on lowercased 13a tokens, as an offline stand-in for the
  E2E challenge's mteval script.
- METEOR and CIDEr (pycocoevalcap, as the E2E challenge's scripts use them) on lowercased 13a
  tokens; METEOR needs a Java runtime and is ``Unavailable("no Java")`` without one.
- GLUE: scikit-learn / scipy (accuracy, F1, Matthews correlation, Pearson, Spearman).
- Perplexity: ``exp(total negative log-likelihood / predicted tokens)``.
- GSM8K: final-number extraction and numeric exact match.

Scales: ROUGE, BLEU and METEOR are reported on 0-100 (the scale summarization and E2E papers
use), NIST and CIDEr on their own scales, exact match and GLUE metrics on 0-1 like accuracy.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lamda_repro.tasks.text import (  # noqa: F401  (part of this module's interface)
    GSM8K_ANSWER_MARKER,
    extract_final_number,
    normalize_number,
    split_sentences,
)

METRIC_MODULES = Path(__file__).resolve().parent / "metric_modules"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
NO_JAVA = "no Java"


@dataclass(frozen=True)
class Unavailable:
    """A metric that cannot be computed on this machine; ``reason`` is shown in its table cell."""

    reason: str


def load(name: str, config_name: str | None = None):
    """The ``evaluate`` module ``name`` of ``metric_modules/`` (in memory: no cache files)."""
    import evaluate

    path = METRIC_MODULES / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in METRIC_MODULES.glob("*.py") if p.stem != "__init__")
        raise ValueError(f"unknown metric {name!r} (known: {', '.join(known)})")
    return evaluate.load(str(path), config_name, keep_in_memory=True)


def compute(name: str, config_name: str | None = None, **inputs: Any) -> dict[str, float]:
    """``evaluate.load(<metric module>).compute(**inputs)``."""
    return load(name, config_name).compute(**inputs)


def _check_pairs(predictions: Sequence, references: Sequence, what: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError(f"{what}: no predictions to score")


def _reference_lists(references: Sequence[str | Sequence[str]], what: str) -> list[list[str]]:
    """Each example's references as a list (a single string is one reference)."""
    out = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(len(refs) == 0 for refs in out):
        raise ValueError(f"{what}: an example has no reference")
    return out


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
    rouge_types = tuple(rouge_types)
    unknown = [t for t in rouge_types if t not in ROUGE_TYPES]
    if unknown:
        raise ValueError(f"unknown ROUGE type(s) {unknown}; known: {list(ROUGE_TYPES)}")
    _check_pairs(predictions, references, "rouge_scores")
    refs = _reference_lists(references, "rouge_scores")
    return compute(
        "rouge",
        predictions=list(predictions),
        references=refs,
        rouge_types=rouge_types,
        use_stemmer=use_stemmer,
    )


def bleu_score(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0-100); each example may have a different number of references."""
    _check_pairs(predictions, references, "bleu_score")
    refs = _reference_lists(references, "bleu_score")
    return compute("bleu", predictions=list(predictions), references=refs)["bleu"]


def nist_score(predictions: Sequence[str], references: Sequence[str | Sequence[str]], n: int = 5) -> float:
    """Corpus NIST (nltk) on lowercased sacrebleu-13a tokens."""
    _check_pairs(predictions, references, "nist_score")
    refs = _reference_lists(references, "nist_score")
    return compute("nist", predictions=list(predictions), references=refs, n=n)["nist"]


def java_available() -> bool:
    """Whether a Java runtime is on PATH (METEOR's scorer is a Java program)."""
    return shutil.which("java") is not None


def meteor_score(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> float | Unavailable:
    """METEOR 1.5 (0-100, pycocoevalcap), or ``Unavailable("no Java")`` without a Java runtime."""
    _check_pairs(predictions, references, "meteor_score")
    refs = _reference_lists(references, "meteor_score")
    if not java_available():
        return Unavailable(NO_JAVA)
    return compute("meteor", predictions=list(predictions), references=refs)["meteor"]


def cider_score(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """CIDEr (pycocoevalcap's CIDEr-D) on lowercased 13a tokens."""
    _check_pairs(predictions, references, "cider_score")
    refs = _reference_lists(references, "cider_score")
    return compute("cider", predictions=list(predictions), references=refs)["cider"]


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood per predicted token."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs at least one predicted token, got {n_tokens}")
    if not math.isfinite(total_nll):
        raise ValueError(f"perplexity: total negative log-likelihood is {total_nll}")
    return compute("perplexity", nll=[float(total_nll)], tokens=[int(n_tokens)])["perplexity"]


def gsm8k_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0-1) of predictions whose extracted final number equals the reference's."""
    _check_pairs(predictions, references, "gsm8k_exact_match")
    return compute("exact_match", predictions=list(predictions), references=list(references))["exact_match"]


def glue_scores(subset: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """The official metrics of one GLUE subset (scikit-learn / scipy)."""
    _check_pairs(predictions, references, f"glue ({subset})")
    return compute("glue", subset, predictions=list(predictions), references=list(references))
