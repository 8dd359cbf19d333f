"""METEOR 1.5 (0-100) with pycocoevalcap's wrapper of the official Java scorer (English, exact,
stem, synonym and paraphrase modules, ``-norm``), on lowercased 13a tokens. Needs a Java runtime
on PATH; loading the paraphrase table takes several seconds."""

import contextlib

import datasets
import evaluate

from lamda_repro.tasks.text import metric_tokens


class Meteor(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Denkowski and Lavie, Meteor universal: language specific translation evaluation "
            "for any target language, WMT 2014",
            inputs_description="predictions: strings; references: a list of reference strings per prediction",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        from pycocoevalcap.meteor.meteor import Meteor as JavaMeteor

        def line(text):  # the scorer reads one line per segment, fields split by "|||"
            return " ".join(metric_tokens(text)).replace("|||", "")

        hyps = {i: [line(p)] for i, p in enumerate(predictions)}
        refs = {i: [line(r) for r in example] for i, example in enumerate(references)}
        scorer = JavaMeteor()
        process = scorer.meteor_p
        try:
            score, _ = scorer.compute_score(refs, hyps)
        except (ValueError, OSError) as exc:  # an empty or broken answer: the Java process died
            process.kill()
            detail = process.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"METEOR: the Java scorer failed ({exc}): {' '.join(detail)}") from None
        finally:
            if scorer.lock.locked():  # a failed exchange leaves the wrapper's lock held
                scorer.lock.release()
            with contextlib.suppress(OSError):
                process.stdin.close()
            process.kill()
            process.wait()
        return {"meteor": 100.0 * float(score)}
