"""GLUE metrics of one subset (the config name): accuracy, F1, Matthews correlation, Pearson and
Spearman correlation, computed by scikit-learn and scipy as the Hub's ``glue`` metric does."""

import datasets
import evaluate

# subset -> the metrics the GLUE benchmark reports for it
SUBSET_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
}


class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in SUBSET_METRICS:
            raise KeyError(f"GLUE subset {self.config_name!r} unknown (known: {sorted(SUBSET_METRICS)})")
        value = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Wang et al., GLUE: a multi-task benchmark and analysis platform for NLU, ICLR 2019",
            inputs_description="predictions, references: labels (scores for stsb), one per example",
            features=datasets.Features(
                {"predictions": datasets.Value(value), "references": datasets.Value(value)}
            ),
        )

    def _compute(self, predictions, references):
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        scorers = {
            "accuracy": lambda: accuracy_score(references, predictions),
            "f1": lambda: f1_score(references, predictions),
            "matthews_correlation": lambda: matthews_corrcoef(references, predictions),
            "pearson": lambda: pearsonr(predictions, references)[0],
            "spearmanr": lambda: spearmanr(predictions, references)[0],
        }
        return {name: float(scorers[name]()) for name in SUBSET_METRICS[self.config_name]}
