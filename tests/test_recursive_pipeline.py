"""Smoke corpus, tasks, lm-eval on converted models, config checks, records -> table and figure."""

import json

import pytest
import torch

from lamda_repro.recursive import corpus
from lamda_repro.recursive.convert import convert_to_recursive
from lamda_repro.recursive.evaluate import EvalConfigError, lm_eval_accuracy, perplexity
from lamda_repro.recursive.report import plot_accuracy_vs_params, records_frame, write_table
from lamda_repro.recursive.runner import (
    build_variant,
    resolve_section,
    run_artifacts,
    run_job_inputs,
    run_teacher,
    uptrain_config,
)
from lamda_repro.recursive.tiny import tiny_causal_lm


def test_smoke_corpus_is_deterministic_and_fully_tokenized():
    docs = corpus.smoke_documents(50, seed=3)
    assert docs == corpus.smoke_documents(50, seed=3) and docs != corpus.smoke_documents(50, seed=4)
    tokenizer = corpus.build_word_tokenizer(corpus.smoke_vocabulary())
    ids = tokenizer(docs[0])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == docs[0]


def test_smoke_facts_follow_the_fixed_mapping():
    for doc in corpus.smoke_documents(20, seed=0):
        words = doc.split()
        for i, word in enumerate(words[:-2]):
            if word == "eats":
                assert words[i + 1] == corpus.food_of(words[i - 1])


@pytest.mark.parametrize("task", corpus.SMOKE_TASKS)
def test_task_examples_have_one_correct_choice(task):
    rows = corpus.task_examples(task, 30, seed=0)
    assert rows == corpus.task_examples(task, 30, seed=0)
    for row in rows:
        assert len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
    labels = {row["label"] for row in rows}
    assert len(labels) > 1  # the answer position varies


def test_packed_batches_have_the_requested_shape():
    tokenizer = corpus.build_word_tokenizer(corpus.smoke_vocabulary())
    docs = corpus.smoke_documents(30, seed=0)
    batch = next(corpus.batches(iter(docs), tokenizer, seq_len=16, batch_size=3))
    assert batch.shape == (3, 16) and batch.dtype == torch.long


@pytest.mark.slow
def test_lm_eval_runs_on_a_converted_model_with_local_tasks(tmp_path):
    tokenizer = corpus.build_word_tokenizer(corpus.smoke_vocabulary())
    tasks = corpus.write_smoke_tasks(tmp_path / "tasks", seed=0, test_size=6, train_size=4)
    torch.manual_seed(0)
    model = tiny_causal_lm(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    relaxed = convert_to_recursive(model, num_loops=2, init="average", lora_rank=2)
    scores = lm_eval_accuracy(
        relaxed, tokenizer, tasks, include_path=str(tmp_path / "tasks"), num_fewshot=1, batch_size=8
    )
    assert set(scores) == set(tasks) and all(0.0 <= s <= 1.0 for s in scores.values())
    assert all(abs(s * 6 - round(s * 6)) < 1e-9 for s in scores.values())  # 6 examples per task
    with pytest.raises(EvalConfigError, match="unknown lm-eval tasks"):
        lm_eval_accuracy(relaxed, tokenizer, ["no_such_task"], include_path=str(tmp_path / "tasks"))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 10) + self.w})()

    value = perplexity(Uniform(), [torch.randint(0, 10, (2, 8))])
    assert abs(value - 10.0) < 1e-4


SECTION = {
    "models": {"tiny": {"pretrain": {"num_layers": 4}}},
    "uptrain": {"steps": 2},
    "runs": [
        {"name": "full", "model": "tiny", "variant": "original"},
        {"name": "rrt", "model": "tiny", "variant": "recursive", "num_loops": 2, "lora_rank": 4},
        {"name": "half", "model": "tiny", "variant": "truncated", "num_loops": 2, "uptrain": {"lr": 0.1}},
    ],
}


def test_section_defaults_and_uptrain_selection():
    section = resolve_section(SECTION)
    assert section["corpus"]["kind"] == "smoke" and section["eval"]["tasks"] == list(corpus.SMOKE_TASKS)
    full, rrt, half = section["runs"]
    assert uptrain_config(section, full) is None
    assert uptrain_config(section, rrt).steps == 2
    assert uptrain_config(section, half).lr == 0.1 and uptrain_config(section, half).steps == 2


def _with_budgets(**runs_extra):
    import copy

    section = copy.deepcopy(SECTION)
    section["budgets"] = {"long": {"steps": 5, "warmup_steps": 1}, "long-kd": {"steps": 5, "kd_weight": 0.5}}
    section["runs"][0].update(budget="long", save_model=True)
    section["runs"].append(
        {
            "name": "student",
            "model": "tiny",
            "variant": "scratch",
            "num_loops": 2,
            "budget": "long-kd",
            **runs_extra,
        }
    )
    return section


def test_budgets_name_uptraining_settings_and_runs_name_their_teacher():
    section = resolve_section(_with_budgets(teacher="full", uptrain={"lr": 0.1}))
    full, rrt, _, student = section["runs"]
    assert uptrain_config(section, full).steps == 5  # a budget uptrains an original model too
    assert uptrain_config(section, full).warmup_steps == 1 and uptrain_config(section, rrt).steps == 2
    up = uptrain_config(section, student)
    assert (up.steps, up.kd_weight, up.lr) == (5, 0.5, 0.1)  # section < budget < the run's own overrides
    assert run_teacher(section, "tiny--student") == "tiny--full" and run_teacher(section, "tiny--rrt") is None
    # the workflow job of a student waits for its teacher's record; others only for artifacts
    student_inputs = run_job_inputs(section, "tiny--student", "w", "r")
    assert student_inputs[-1] == "r/runs/recursive/tiny--full.json"
    assert run_job_inputs(section, "tiny--rrt", "w", "r") == run_artifacts(section, "tiny--rrt", "w")


def _teacher_of(name, **teacher_run):
    def change(section):
        section.update(_with_budgets(teacher=name))
        section["runs"][0].update(teacher_run)

    return change


def _cycle(section):
    section.update(_with_budgets(teacher="full", save_model=True))
    section["runs"][0].update(budget="long-kd", teacher="student")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["runs"].append({"name": "x", "model": "nope", "variant": "original"}), "unknown model"),
        (lambda s: s["runs"][0].update(budget="none"), "unknown budget 'none'"),
        (lambda s: s.update(_with_budgets(uptrain=False)), "a budget needs uptraining"),
        (_teacher_of("ghost"), r"student.teacher: no run 'tiny--ghost'"),
        (_teacher_of("full", save_model=False), "must set save_model: true"),
        (_teacher_of("rrt"), "must set save_model"),
        (_cycle, r"teacher chain tiny--full -> tiny--student -> tiny--full is a cycle"),
        (
            lambda s: s.update(_with_budgets(teacher="full", uptrain={"kd_weight": 0.0})),
            "a teacher needs uptraining with kd_weight > 0",
        ),
        (
            lambda s: s["runs"].append({"name": "x", "model": "tiny", "variant": "recursive"}),
            "needs num_loops",
        ),
        (lambda s: s["runs"].append({"name": "full", "model": "tiny", "variant": "original"}), "duplicate"),
        (lambda s: s["runs"].append({"name": "x", "model": "tiny", "variant": "loop"}), "variant"),
        (lambda s: s["uptrain"].update(kd_loss="ce"), "kd_loss"),
        (lambda s: s["models"]["tiny"].update(path="a/b"), "models.tiny"),
    ],
)
def test_bad_sections_raise_one_line_errors(change, message):
    import copy

    section = copy.deepcopy(SECTION)
    change(section)
    with pytest.raises(ValueError, match=message) as info:
        resolve_section(section)
    assert "\n" not in str(info.value)


def test_scratch_and_truncated_variants_have_k_layers():
    model = tiny_causal_lm("llama", vocab_size=32, num_layers=6)
    for variant in ("scratch", "truncated"):
        built = build_variant(model, {"variant": variant, "num_loops": 3}, seed=0)
        assert built.config.num_hidden_layers == 2 and len(built.model.layers) == 2
    with pytest.raises(ValueError, match="does not divide"):
        build_variant(model, {"variant": "recursive", "num_loops": 4}, seed=0)


def _record(name, variant, params, avg, status="success", **run):
    metrics = {"acc_t1": avg, "acc_t2": avg, "average": avg, "perplexity": 3.0} if status == "success" else {}
    return {
        "kind": "recursive",
        "run_id": f"m--{name}",
        "status": status,
        "spec": {"run": {"name": name, "model": "m", "variant": variant, **run}, "model": {"label": "M"}},
        "params": {"non_embedding": params},
        "metrics": metrics,
    }


def test_table_and_figure_from_records(tmp_path):
    records = [
        _record("full", "original", 2000, 0.8),
        _record("rt", "recursive", 1000, 0.7, num_loops=2, init="average"),
        _record("rrt", "recursive", 1200, 0.75, num_loops=2, init="average", lora_rank=8),
        _record("broken", "recursive", 1000, 0.0, status="failed", num_loops=2),
        {"kind": "finetune", "run_id": "other"},
    ]
    frame = write_table(records, tmp_path / "t")
    assert list(frame["run"]) == ["broken", "rt", "rrt", "full"]
    md = (tmp_path / "t.md").read_text()
    assert "relaxed r=8 (svd) B=2 cycle average" in md and "failed" in md and "80.0" in md
    assert (tmp_path / "t.csv").exists() and "\\begin{tabular}" in (tmp_path / "t.tex").read_text()
    out = plot_accuracy_vs_params(records, tmp_path / "f.png")
    assert out.stat().st_size > 1000
    assert records_frame([]).empty


def test_paper_numbers_are_rows_under_their_runs(tmp_path):
    records = [_record("full", "original", 2000, 0.8), _record("rt", "recursive", 1000, 0.7, num_loops=2)]
    cells = [
        {
            "table": "F.1",
            "row": "M",
            "column": "Stepwise",
            "run": "m--rt",
            "value": 51.7,
            "non_embedding": 0.99e9,
        },
        {"table": "I.2", "row": "M", "column": "Stepwise", "run": "m--not-in-this-config", "value": 54.9},
    ]
    frame = write_table(records, tmp_path / "t", cells)
    assert list(frame["run"]) == ["rt", "rt", "full"] and list(frame["status"]) == [
        "success",
        "paper",
        "success",
    ]
    md = (tmp_path / "t.md").read_text().splitlines()
    paper = next(line for line in md if "paper, Table F.1: Stepwise" in line)
    assert "51.7" in paper and "990.000M" in paper and "failed" not in paper and "54.9" not in "".join(md)
    assert "paper" not in (tmp_path / "t.csv").read_text().split("\n", 1)[0]  # a status, not a column
    assert list(write_table(records, tmp_path / "u")["status"]) == ["success", "success"]


def test_cli_counts_command(tmp_path, capsys):
    from lamda_repro.recursive.cli import main
    from lamda_repro.recursive.tiny import tiny_config

    tiny_config("gemma", num_layers=4).save_pretrained(tmp_path)
    assert (
        main(["recursive-counts", "--model-config", str(tmp_path), "--num-loops", "2", "--lora-rank", "4"])
        == 0
    )
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["recursive"] * 2 == counts["vanilla"] and counts["relaxed"] > counts["recursive"]


@pytest.mark.slow
def test_execute_run_end_to_end_writes_a_complete_record(tmp_path):
    from lamda_repro.recursive.runner import execute_run, prepare_corpus, pretrain_model, tokenize_corpus

    section = resolve_section(
        {
            "corpus": {"num_documents": 200, "num_validation": 20, "task_test_size": 8},
            "models": {
                "tiny": {
                    "pretrain": {
                        "hidden_size": 32,
                        "num_layers": 4,
                        "intermediate_size": 64,
                        "steps": 5,
                        "batch_size": 4,
                        "seq_len": 32,
                    }
                }
            },
            "uptrain": {"steps": 3, "batch_size": 4, "seq_len": 32, "kd_weight": 0.5},
            "eval": {"ppl_batches": 2, "throughput_seq_len": 16, "throughput_batch_size": 2},
            "runs": [
                {
                    "name": "rrt",
                    "model": "tiny",
                    "variant": "recursive",
                    "num_loops": 2,
                    "lora_rank": 2,
                    "save_model": True,
                }
            ],
        }
    )
    prepare_corpus(section, tmp_path)
    tokenize_corpus(section, "corpus", tmp_path)
    pretrain_model(section, "tiny", tmp_path, torch.device("cpu"))
    record = execute_run(section, "tiny--rrt", tmp_path, "cpu")
    assert record["status"] == "success", record.get("error")
    assert set(record["metrics"]) == {
        "acc_smoke_facts",
        "acc_smoke_count",
        "acc_smoke_copy",
        "average",
        "perplexity",
    }
    assert record["params"]["non_embedding"] < record["params"]["non_embedding_base"]
    assert record["train"]["tokens"] == 3 * 4 * 32 and record["throughput"]["forward_tokens_per_s"] > 0
    assert (tmp_path / "recursive" / "runs" / "tiny--rrt" / "model.safetensors").exists()
    failed = execute_run(
        {**section, "models": {"tiny": {"path": str(tmp_path / "missing")}}}, "tiny--rrt", tmp_path, "cpu"
    )
    assert failed["status"] == "failed" and failed["error"]


@pytest.mark.slow
def test_a_student_distils_from_its_teachers_saved_model(tmp_path):
    from lamda_repro.recursive.runner import execute_run, prepare_corpus, pretrain_model, tokenize_corpus

    tiny = {
        "hidden_size": 32,
        "num_layers": 4,
        "intermediate_size": 64,
        "steps": 5,
        "batch_size": 4,
        "seq_len": 32,
    }
    raw = {
        "corpus": {"num_documents": 200, "num_validation": 20, "task_test_size": 8},
        "models": {"tiny": {"pretrain": tiny}},
        "uptrain": {"steps": 2, "batch_size": 4, "seq_len": 32, "lr": 0.01},
        "budgets": {"kd": {"kd_weight": 0.5}},
        "eval": {"ppl_batches": 1, "throughput_seq_len": 16, "throughput_batch_size": 2},
        "runs": [
            {"name": "teacher", "model": "tiny", "variant": "original", "uptrain": True, "save_model": True},
            {
                "name": "student",
                "model": "tiny",
                "variant": "recursive",
                "num_loops": 2,
                "budget": "kd",
                "teacher": "teacher",
            },
            {"name": "from-base", "model": "tiny", "variant": "recursive", "num_loops": 2, "budget": "kd"},
        ],
    }
    section = resolve_section(raw)
    prepare_corpus(section, tmp_path)
    tokenize_corpus(section, "corpus", tmp_path)
    pretrain_model(section, "tiny", tmp_path, torch.device("cpu"))
    early = execute_run(section, "tiny--student", tmp_path, "cpu")
    assert early["status"] == "failed" and "teacher run tiny--teacher has no saved model" in early["error"]
    teacher = execute_run(section, "tiny--teacher", tmp_path, "cpu")
    assert teacher["status"] == "success" and teacher["spec"]["teacher"] is None
    assert teacher["tokens_seen"] == 2 * 4 * 32
    student = execute_run(section, "tiny--student", tmp_path, "cpu")
    from_base = execute_run(section, "tiny--from-base", tmp_path, "cpu")
    assert student["status"] == from_base["status"] == "success", student.get("error")
    assert student["spec"]["teacher"] == "tiny--teacher" and from_base["spec"]["teacher"] == "base"
    assert student["tokens_seen"] == from_base["tokens_seen"] == 2 * 4 * 32
    # Same student, same data and seed: only the teacher differs, and so does the loss.
    assert student["train"]["first_loss"] != from_base["train"]["first_loss"]


def test_local_tasks_skip_the_harness_catalogue(tmp_path):
    from lamda_repro.recursive.evaluate import task_manager

    tasks = corpus.write_smoke_tasks(tmp_path / "tasks", seed=0, test_size=2, train_size=2)
    manager = task_manager(tasks, str(tmp_path / "tasks"))
    assert sorted(manager.match_tasks(tasks)) == sorted(tasks)
    assert manager.match_tasks(["hellaswag"]) == []  # the catalogue was not indexed
