"""Text normalisation shared by the metric modules: sentence splitting, metric tokens, GSM8K numbers.

Pure functions of strings, so the metrics built on them are deterministic and their pieces can be
pinned in tests.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# Sentence boundaries for rougeLsum, which scores the union LCS over newline-separated
# sentences. A rule instead of nltk's punkt model, whose data files are not shipped offline.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at '.', '!' or '?' followed by whitespace and a capital/digit."""
    parts = []
    for line in text.strip().splitlines():
        parts.extend(p.strip() for p in _SENTENCE_END.split(line) if p.strip())
    return parts


def metric_tokens(text: str) -> list[str]:
    """Lowercased sacrebleu-13a tokens: the tokens NIST, METEOR and CIDEr are computed on."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower()).split()


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
