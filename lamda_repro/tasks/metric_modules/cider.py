"""CIDEr with pycocoevalcap (its CIDEr-D form: n-grams 1-4, TF-IDF over the evaluated corpus's
references, clipping and a Gaussian length penalty with sigma 6, times 10), on lowercased
13a tokens. Pure Python."""

import datasets
import evaluate

from lamda_repro.tasks.text import metric_tokens


class Cider(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Vedantam, Zitnick and Parikh, CIDEr: consensus-based image description evaluation, "
            "CVPR 2015",
            inputs_description="predictions: strings; references: a list of reference strings per prediction",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        from pycocoevalcap.cider.cider import Cider as CocoCider

        hyps = {i: [" ".join(metric_tokens(p))] for i, p in enumerate(predictions)}
        refs = {i: [" ".join(metric_tokens(r)) for r in example] for i, example in enumerate(references)}
        score, _ = CocoCider().compute_score(refs, hyps)
        return {"cider": float(score)}
