"""Numeric exact match (0-1) of GSM8K-style answers: the final number of each prediction against
the reference's (the number after the last "####", else the last number; compared as
normalized decimals, so "1,200.00" matches "1200")."""

import datasets
import evaluate

from lamda_repro.tasks.text import extract_final_number


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Cobbe et al., Training verifiers to solve math word problems, arXiv 2110.14168",
            inputs_description="predictions: generated solutions; references: reference solutions",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        hits = 0
        for prediction, reference in zip(predictions, references, strict=True):
            gold = extract_final_number(reference)
            if gold is None:
                raise ValueError(f"reference has no final number: {reference[-80:]!r}")
            hits += int(extract_final_number(prediction) == gold)
        return {"exact_match": hits / len(predictions)}
