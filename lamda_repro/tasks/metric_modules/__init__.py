"""The suite's metrics as ``evaluate`` modules, shipped inside the package.

Each file here is one ``evaluate.Metric`` that ``lamda_repro.tasks.metrics`` loads with
``evaluate.load(<path of the file>)`` (offline: nothing comes from the Hub) and that calls the
maintained scorer: scikit-learn / scipy (GLUE), rouge-score (ROUGE), sacrebleu (BLEU), nltk
(NIST), pycocoevalcap (METEOR, CIDEr); exact match and perplexity are a few lines each.
The files are loaded by path rather than imported, so each must stand on its own: absolute
imports only.
"""
