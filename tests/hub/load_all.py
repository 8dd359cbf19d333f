"""Load every model, task, corpus and lm-eval task of a config through the suite's own code.

Run as a separate process against the replica server (HF_ENDPOINT, HF_HOME and HF_TOKEN set by the
caller), so that huggingface_hub / datasets / transformers read those settings at import as they do
on a login node. Writes one JSON report: item -> {"ok": bool, "detail": str}. Each item is checked
independently; an exception is recorded with its first line, never raised.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path


def check(report: dict, item: str, fn) -> None:
    try:
        detail = fn()
        report[item] = {"ok": True, "detail": str(detail or "")}
    except Exception as exc:  # noqa: BLE001  (the report carries every failure)
        lines = traceback.format_exception_only(type(exc), exc)
        report[item] = {"ok": False, "detail": "".join(lines).strip().splitlines()[0][:400]}


def finetune_items(config: dict, report: dict, workdir: str) -> None:
    import torch

    from lamda_repro.methods.base import MethodContext, build_method
    from lamda_repro.models import load_model
    from lamda_repro.tasks.base import get_task_class

    torch.manual_seed(0)
    seen = set()
    for exp in config["experiments"].values():
        for model_name in exp["models"]:
            entry = config["models"][model_name]
            for task_name in exp["tasks"]:
                if (model_name, task_name) in seen:
                    continue
                seen.add((model_name, task_name))
                params = dict(config["tasks"][task_name])
                task = get_task_class(params["type"])(task_name, params)

                def run(task=task, entry=entry, model_name=model_name):
                    splits = task.load_splits()
                    labels = getattr(task, "num_labels", None) if task.task_kind == "seq-cls" else None
                    model, tok = load_model(entry, model_name, workdir, task.task_kind, labels)
                    train = task.tokenize(splits["train"].select(range(2)), tok, 64)
                    collator = task.data_collator(tok, model)
                    batch = collator([train[i] for i in range(min(2, len(train)))])
                    loss = model(**batch).loss
                    if not math.isfinite(float(loss)):
                        raise ValueError(f"loss {loss}")
                    eval_raw = splits["eval"].select(range(2))
                    eval_tok = task.tokenize(eval_raw, tok, 64)
                    gen = {"max_new_tokens": 2, "num_beams": 1}
                    scores = task.evaluate(model, tok, eval_raw, eval_tok, 2, gen)
                    return (
                        f"{type(model).__name__}; eval split rows {len(splits['eval'])}; {sorted(scores)[:3]}"
                    )

                check(report, f"finetune:{model_name}:{task_name}", run)
    # The adapters of each method on each model: which modules get adapted.
    for exp in config["experiments"].values():
        for model_name in exp["models"]:
            for method_name in exp["methods"]:
                key = f"method:{model_name}:{method_name}"
                if key in report or config["methods"][method_name]["type"] not in ("lora",):
                    continue
                entry = config["models"][model_name]
                task = config["tasks"][exp["tasks"][0]]
                kind = get_task_class(task["type"]).task_kind

                def adapt(entry=entry, model_name=model_name, method_name=method_name, kind=kind):
                    model, _ = load_model(entry, model_name, workdir, kind, 2 if kind == "seq-cls" else None)
                    method = build_method(config["methods"][method_name])
                    model = method.apply(
                        model, MethodContext(task_kind=kind, model_type=model.config.model_type)
                    )
                    adapted = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
                    return json.dumps(adapted)

                check(report, key, adapt)


def recursive_items(config: dict, report: dict, workdir: str) -> None:
    import torch

    from lamda_repro.recursive.corpus import iter_texts
    from lamda_repro.recursive.runner import load_base

    section = config["recursive"]
    for name in section["models"]:

        def run(name=name):
            model, tok = load_base(section, name, Path(workdir), torch.device("cpu"))
            ids = tok("the quick brown fox", return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, labels=ids)
            return f"{type(model).__name__}; loss {float(out.loss):.3f}"

        check(report, f"recursive:{name}", run)
    corpus = section["corpus"]
    for split in ("train", "validation"):

        def stream(split=split):
            texts = []
            for text in iter_texts(corpus, split):
                texts.append(text)
                if len(texts) == 2:
                    break
            if not texts:
                raise ValueError("no rows")
            return f"{len(texts)} rows streamed"

        check(report, f"corpus:{corpus['name']}:{split}", stream)

    def lm_eval_tasks():
        from lm_eval.tasks import TaskManager, get_task_dict

        tasks = get_task_dict(list(section["eval"]["tasks"]), TaskManager())
        sizes = {}
        for name, task in tasks.items():
            docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
            sizes[name] = len(list(docs))
        if set(sizes) != set(section["eval"]["tasks"]) or not all(sizes.values()):
            raise ValueError(f"tasks constructed: {sizes}")
        return json.dumps(sizes)

    check(report, "lm_eval:tasks", lm_eval_tasks)


def main(argv: list[str]) -> int:
    from lamda_repro.config import load_config

    config_path, out, workdir = argv[1], Path(argv[2]), argv[3]
    config = load_config(config_path)
    report: dict = {}
    finetune_items(config, report, workdir)
    recursive_items(config, report, workdir)
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
