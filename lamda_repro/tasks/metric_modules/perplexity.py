"""Perplexity from summed negative log-likelihoods: exp(sum of NLL / sum of predicted tokens),
over any number of parts (sequences, batches or a whole corpus)."""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="nll: summed next-token negative log-likelihood (nats) of each part; "
            "tokens: the number of predicted tokens of each part",
            features=datasets.Features({"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, tokens):
        return {"perplexity": math.exp(sum(nll) / sum(tokens))}
