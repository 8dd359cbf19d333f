"""ROUGE F-measures (0-100) with rouge-score and the Porter stemmer: the mean over examples of each
example's F-measure. With several references an example scores its best one (``score_multi``).
For rougeLsum, texts are split into newline-separated sentences first.

``evaluate``'s Hub ROUGE aggregates with a random bootstrap; the mean of per-example scores is
the same point estimate without randomness."""

import datasets
import evaluate

from lamda_repro.tasks.text import split_sentences

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Lin, ROUGE: a package for automatic evaluation of summaries, ACL workshop 2004",
            inputs_description="predictions: strings; references: a list of reference strings per prediction",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, rouge_types=ROUGE_TYPES, use_stemmer=True):
        from rouge_score import rouge_scorer

        rouge_types = tuple(rouge_types)
        unknown = [t for t in rouge_types if t not in ROUGE_TYPES]
        if unknown:
            raise ValueError(f"unknown ROUGE type(s) {unknown}; known: {list(ROUGE_TYPES)}")
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
        totals = dict.fromkeys(rouge_types, 0.0)
        for prediction, refs in zip(predictions, references, strict=True):
            if "rougeLsum" in rouge_types:
                prediction = "\n".join(split_sentences(prediction))
                refs = ["\n".join(split_sentences(r)) for r in refs]
            scores = scorer.score_multi(refs, prediction)
            for rouge_type in rouge_types:
                totals[rouge_type] += scores[rouge_type].fmeasure
        return {t: 100.0 * totals[t] / len(predictions) for t in rouge_types}
