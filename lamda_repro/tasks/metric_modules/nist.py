"""Corpus NIST (nltk, n = 5) on lowercased sacrebleu-13a tokens, an offline stand-in for the E2E
challenge's mteval script."""

import datasets
import evaluate

from lamda_repro.tasks.text import metric_tokens


class Nist(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Doddington, Automatic evaluation of machine translation quality using n-gram "
            "co-occurrence statistics, HLT 2002",
            inputs_description="predictions: strings; references: a list of reference strings per prediction",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, n=5):
        from nltk.translate.nist_score import corpus_nist

        hyps = [metric_tokens(p) for p in predictions]
        refs = [[metric_tokens(r) for r in example] for example in references]
        longest = max(len(h) for h in hyps)
        if longest == 0:
            return {"nist": 0.0}
        # nltk divides by the number of hypothesis n-grams of each order; orders no hypothesis
        # reaches contribute nothing (as in mteval), which capping n expresses.
        return {"nist": float(corpus_nist(refs, hyps, n=min(n, longest)))}
