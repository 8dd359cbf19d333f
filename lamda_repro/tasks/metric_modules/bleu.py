"""Corpus BLEU (0-100) with sacrebleu: 13a tokenization, exponential smoothing, any number of
references per prediction (a missing reference is passed to sacrebleu as None)."""

import datasets
import evaluate


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Post, A call for clarity in reporting BLEU scores, WMT 2018",
            inputs_description="predictions: strings; references: a list of reference strings per prediction",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        import sacrebleu

        width = max(len(refs) for refs in references)
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
        return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), streams).score)}
