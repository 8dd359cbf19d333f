"""Tables from synthetic run records: values, seed statistics, failed/missing/n/a cells, ratios."""

import math
from pathlib import Path

import pandas as pd
import pytest

from lamda_repro import tables
from lamda_repro.claims import parse_reference


def finetune_record(
    task="sst2",
    method="lora_r8",
    method_type="lora",
    r=8,
    seed=0,
    score=0.9,
    status="success",
    metric="accuracy",
    experiment="nlu",
    family="nlu",
    model="minilm",
    updates=8000,
    trainable=80000,
    saved=4096,
    state=8192,
    peak=2**20,
    peak_kind="cpu_rss",
    scale=None,
):
    spec = {
        "experiment": experiment,
        "family": family,
        "task": task,
        "model": model,
        "method": method,
        "method_type": method_type,
        "method_params": {"type": method_type, **({"r": r} if r else {})},
        "seed": seed,
    }
    if scale:
        spec["scale"] = scale
    ok = status == "success"
    return {
        "schema_version": 1,
        "run_id": f"{experiment}/{task}/{model}/{method}/seed{seed}",
        "kind": "finetune",
        "spec": spec,
        "status": status,
        "error": None if ok else "RuntimeError: out of memory",
        "metrics": {metric: score} if ok else {},
        "primary_metric": metric,
        "params": {"trainable": trainable, "total": 10**6},
        "parameter_updates": updates,
        "memory": {
            "peak_bytes": peak,
            "peak_kind": peak_kind,
            "saved_for_backward_bytes": saved,
            "train_state_bytes": state,
        },
        "throughput": {"train_samples_per_s": 50.0},
        "wall_time_s": 3.0,
    }


class FakeReference:
    def __init__(self, values):
        self.values = values

    def table_value(self, **key):
        return self.values.get(tuple(key[k] for k in ("family", "task", "model", "method", "metric")))


def cells_of(records):
    return tables.cell_summary(tables.finetune_frame(records))


def suite_row(table, method):
    return table[(table["method"] == method) & (table["row"] == tables.SUITE_ROW)].iloc[0]


def paper_row(table, method):
    return table[(table["method"] == method) & (table["row"] == tables.PAPER_ROW)].iloc[0]


def test_mean_and_std_over_seeds_in_percent_points():
    recs = [finetune_record(seed=0, score=0.90), finetune_record(seed=1, score=0.92)]
    table = tables.family_table(cells_of(recs), "nlu")
    assert suite_row(table, "lora_r8")["sst2 (accuracy)"] == "91.00 ± 1.41"


def test_single_seed_has_no_std():
    table = tables.family_table(cells_of([finetune_record(score=0.875)]), "nlu")
    assert suite_row(table, "lora_r8")["sst2 (accuracy)"] == "87.50"


def test_non_percent_metric_is_not_scaled():
    recs = [
        finetune_record(
            task="wikitext", metric="perplexity", score=23.456, family="generation", experiment="gen"
        )
    ]
    table = tables.family_table(cells_of(recs), "generation")
    assert suite_row(table, "lora_r8")["wikitext (perplexity)"] == "23.46"


def test_rouge_and_bleu_are_recorded_on_0_100_and_shown_as_they_are():
    recs = [
        finetune_record(task="xsum", metric="rouge2", score=37.5, family="summarization", experiment="sum")
    ]
    table = tables.family_table(cells_of(recs), "summarization")
    assert suite_row(table, "lora_r8")["xsum (rouge2)"] == "37.50"


def test_failed_run_shows_failed_never_a_number():
    recs = [finetune_record(status="failed")]
    table = tables.family_table(cells_of(recs), "nlu")
    row = suite_row(table, "lora_r8")
    assert row["sst2 (accuracy)"] == "failed"
    assert row["trainable params"] == "failed"
    assert row["avg"] == tables.MISSING


def test_one_failed_seed_marks_the_whole_cell_failed():
    recs = [finetune_record(seed=0, score=0.9), finetune_record(seed=1, status="failed")]
    cell = suite_row(tables.family_table(cells_of(recs), "nlu"), "lora_r8")["sst2 (accuracy)"]
    assert cell == "failed (1 of 2 seeds)"
    assert not any(ch.isdigit() for ch in cell.split("(")[0])


def test_missing_run_shows_dash_and_blocks_the_average():
    recs = [
        finetune_record(task="sst2", method="lora_r8"),
        finetune_record(task="stsb", method="lora_r8", metric="pearson", score=0.8),
        finetune_record(task="sst2", method="lamda_r8", method_type="lamda", score=0.88),
    ]
    table = tables.family_table(cells_of(recs), "nlu")
    assert suite_row(table, "lamda_r8")["stsb (pearson)"] == tables.MISSING
    assert suite_row(table, "lamda_r8")["avg"] == tables.MISSING
    assert suite_row(table, "lora_r8")["avg"] == "85.00"


def test_average_ignores_lower_is_better_metrics():
    recs = [
        finetune_record(task="e2e", metric="bleu", score=60.0, family="generation"),
        finetune_record(task="wiki", metric="perplexity", score=20.0, family="generation"),
    ]
    table = tables.family_table(cells_of(recs), "generation")
    assert suite_row(table, "lora_r8")["avg"] == "60.00"


def test_paper_row_holds_the_reference_numbers_and_na_for_the_rest():
    recs = [finetune_record(task="sst2"), finetune_record(task="rte", score=0.7)]
    ref = FakeReference({("nlu", "sst2", "minilm", "lora_r8", "accuracy"): 95.1})
    table = tables.family_table(cells_of(recs), "nlu", ref)
    paper = paper_row(table, "lora_r8")
    assert paper["sst2 (accuracy)"] == "95.10"
    assert paper["rte (accuracy)"] == tables.UNKNOWN_PAPER
    assert paper["avg"] == tables.UNKNOWN_PAPER


def test_no_paper_row_where_the_reference_holds_no_number():
    recs = [finetune_record(method="lora_r8"), finetune_record(method="full_ft", method_type="full", r=None)]
    ref = FakeReference({("nlu", "sst2", "minilm", "lora_r8", "accuracy"): 95.1})
    table = tables.family_table(cells_of(recs), "nlu", ref)
    assert list(zip(table["method"], table["row"], strict=True)) == [
        ("full_ft", tables.SUITE_ROW),
        ("lora_r8", tables.SUITE_ROW),
        ("lora_r8", tables.PAPER_ROW),
    ]
    assert set(tables.family_table(cells_of(recs), "nlu")["row"]) == {tables.SUITE_ROW}


def test_committed_reference_adds_no_paper_row_while_it_holds_no_number():
    from lamda_repro.claims import load_reference

    ref = load_reference(Path(__file__).resolve().parents[1] / "results/reference/papers.yaml")
    recs = [finetune_record(task="sst2", model="deberta_v3_base", method="lora")]
    table = tables.family_table(cells_of(recs), "nlu", ref)
    known = ref.table_value(
        family="nlu", task="sst2", model="deberta_v3_base", method="lora", metric="accuracy"
    )
    assert (tables.PAPER_ROW in set(table["row"])) == (known is not None)


def e2e_record(method="lora_r8", seed=0, bleu=60.0, meteor=40.0, unavailable=None, status="success"):
    rec = finetune_record(
        task="e2e", method=method, seed=seed, metric="bleu", score=bleu, family="generation",
        experiment="e2e", model="gpt2", status=status,
    )  # fmt: skip
    rec["spec"]["task_params"] = {"type": "e2e_nlg"}
    if status == "success":
        rec["metrics"].update({"nist": 5.5, "rougeL": 70.0, "cider": 2.5, "num_mrs": 10.0})
        if meteor is not None:
            rec["metrics"]["meteor"] = meteor
    if unavailable:
        rec["unavailable_metrics"] = unavailable
    return rec


def test_e2e_table_has_the_official_metric_set_as_columns():
    recs = [e2e_record(seed=0, bleu=60.0, meteor=40.0), e2e_record(seed=1, bleu=62.0, meteor=42.0)]
    table = tables.family_table(cells_of(recs), "generation")
    row = suite_row(table, "lora_r8")
    assert [c for c in table.columns if c.startswith("e2e")] == [
        "e2e (bleu)",
        "e2e (nist)",
        "e2e (meteor)",
        "e2e (rougeL)",
        "e2e (cider)",
    ]
    assert row["e2e (bleu)"] == "61.00 ± 1.4142" and row["e2e (meteor)"] == "41.00 ± 1.4142"
    assert row["e2e (nist)"] == "5.5000 ± 0.0000" and row["e2e (cider)"] == "2.5000 ± 0.0000"
    assert row["e2e (rougeL)"] == "70.00 ± 0.0000"


def test_meteor_without_java_says_so_in_its_cell():
    recs = [e2e_record(meteor=None, unavailable={"meteor": "no Java"})]
    table = tables.family_table(cells_of(recs), "generation")
    assert suite_row(table, "lora_r8")["e2e (meteor)"] == "n/a (no Java)"
    assert suite_row(table, "lora_r8")["e2e (bleu)"] == "60.00"
    frame = tables.finetune_frame(recs)
    assert frame["unavailable_meteor"].iloc[0] == "no Java" and math.isnan(frame["metric_meteor"].iloc[0])


def test_failed_e2e_run_shows_failed_in_every_metric_column():
    table = tables.family_table(cells_of([e2e_record(status="failed")]), "generation")
    row = suite_row(table, "lora_r8")
    assert {row[c] for c in table.columns if c.startswith("e2e")} == {tables.FAILED}


def test_older_e2e_record_without_meteor_says_not_recorded():
    table = tables.family_table(cells_of([e2e_record(meteor=None)]), "generation")
    assert suite_row(table, "lora_r8")["e2e (meteor)"] == tables.NOT_RECORDED


def test_methods_are_ordered_baselines_first_lamda_last():
    recs = [
        finetune_record(method="lamda_r8", method_type="lamda"),
        finetune_record(method="full_ft", method_type="full", r=None),
        finetune_record(method="lora_r8"),
    ]
    table = tables.family_table(cells_of(recs), "nlu")
    suite = table[table["row"] == tables.SUITE_ROW]
    assert list(suite["method"]) == ["full_ft", "lora_r8", "lamda_r8"]


def test_family_without_records_says_no_runs_yet():
    table = tables.family_table(cells_of([finetune_record()]), "reasoning")
    assert "no runs yet" in table.iloc[0, 0]


def test_lora_ratio_only_at_equal_rank_in_the_same_task_and_model():
    recs = [
        finetune_record(method="lora_r8", updates=8000, saved=4000, state=9000),
        finetune_record(method="lamda_r8", method_type="lamda", updates=500, saved=1000, state=3000),
        finetune_record(method="lamda_r4", method_type="lamda", r=4, updates=100),
        finetune_record(method="lamda_r8", method_type="lamda", model="other", updates=10),
    ]
    cells = tables.lora_ratios(cells_of(recs))

    def get(method, model="minilm"):
        return cells[(cells["method"] == method) & (cells["model"] == model)].iloc[0]

    assert get("lamda_r8")["updates_lora_ratio"] == pytest.approx(16.0)
    assert get("lamda_r8")["saved_lora_ratio"] == pytest.approx(4.0)
    assert get("lamda_r8")["train_state_lora_ratio"] == pytest.approx(3.0)
    assert math.isnan(get("lamda_r4")["updates_lora_ratio"])
    assert math.isnan(get("lamda_r8", "other")["updates_lora_ratio"])


def test_measurements_table_formats_and_marks_failures():
    recs = [
        finetune_record(method="lora_r8", updates=8000),
        finetune_record(method="lamda_r8", method_type="lamda", updates=500, trainable=64),
        finetune_record(method="full_ft", method_type="full", r=None, status="failed"),
    ]
    table = tables.measurements_table(cells_of(recs)).set_index("method")
    assert table.loc["lamda_r8", "updates LoRA/this"] == "16.00x"
    assert table.loc["lamda_r8", "trainable"] == "64"
    assert table.loc["lora_r8", "trainable"] == "80.00K"
    assert table.loc["lora_r8", "trainable (end)"] == "80.00K"
    assert table.loc["full_ft", "trainable"] == "failed"
    assert table.loc["full_ft", "seeds"] == "0/1"
    assert table.loc["lora_r8", "saved for backward"] == "4.00 KiB"


@pytest.mark.parametrize(
    "value, text",
    [(917504, "917.50K"), (159907840, "159.91M"), (1.98e9, "1.98B"), (12, "12"), (math.nan, "—")],
)
def test_format_count(value, text):
    assert tables.format_count(value) == text


@pytest.mark.parametrize(
    "value, text", [(512, "512 B"), (1536, "1.50 KiB"), (3 * 2**20, "3.00 MiB"), (2**31, "2.00 GiB")]
)
def test_format_bytes(value, text):
    assert tables.format_bytes(value) == text


def test_latex_is_booktabs_and_escaped():
    table = pd.DataFrame({"method": ["lora_r8"], "sst2 (accuracy)": ["91.00 ± 1.41"], "avg": ["—"]})
    tex = tables.to_latex(table, caption="NLU 100%", label="tab:nlu")
    for part in ("\\toprule", "\\midrule", "\\bottomrule", "lora\\_r8", "$\\pm$", "NLU 100\\%"):
        assert part in tex
    assert "±" not in tex and "—" not in tex


def test_markdown_escapes_pipes_and_has_one_line_per_row():
    md = tables.to_markdown(pd.DataFrame({"a|b": ["x|y", "z"]}))
    lines = md.strip().splitlines()
    assert lines[0] == "| a\\|b |" and lines[2] == "| x\\|y |" and len(lines) == 4


def test_record_without_spec_fields_is_rejected():
    rec = finetune_record()
    del rec["spec"]["task"]
    with pytest.raises(tables.TableInputError, match="task"):
        tables.finetune_frame([rec])


def test_frame_skips_other_kinds_and_keeps_failed_scores_empty():
    recs = [finetune_record(status="failed"), {"run_id": "x", "kind": "bench", "spec": {}}]
    frame = tables.finetune_frame(recs)
    assert len(frame) == 1 and math.isnan(frame["score"].iloc[0])
    assert frame["error"].iloc[0].startswith("RuntimeError")


def test_scale_from_spec_or_paper_model_ids():
    assert tables.record_scale({"scale": "paper"}) == "paper"
    spec = {"model_params": {"source": "hub", "id": "microsoft/deberta-v3-base"}}
    assert tables.record_scale(spec, ["microsoft/deberta-v3-base"]) == "paper"
    assert tables.record_scale(spec) == "smoke"
    gemma = {"model": {"path": "google/gemma-2b"}}
    assert tables.record_scale(gemma, ["google/gemma-2b"]) == "paper"
    assert tables.record_scale({"model": "minilm"}, ["google/gemma-2b"]) == "smoke"


def test_reference_parse_rejects_value_without_source():
    data = {
        "schema_version": 1,
        "papers": {},
        "claims": [],
        "table_rows": [
            {
                "family": "nlu",
                "task": "sst2",
                "model": "m",
                "method": "lora",
                "metric": "accuracy",
                "value": 95.0,
            }
        ],
    }
    with pytest.raises(ValueError, match="source"):
        parse_reference(data)


def lamda_record(method, method_type, histogram, uniform, score=0.9, model="minilm", **kw):
    rec = finetune_record(method=method, method_type=method_type, score=score, model=model, **kw)
    rec["method_info"] = {"lamda": {"rank_histogram": histogram, "allocation_uniform": uniform}}
    return rec


def test_lamdapp_row_differs_from_lamda_wherever_the_allocation_differs():
    # Same scores and counts: only the allocation tells the rows apart.
    recs = [
        lamda_record("lamda_r8", "lamda", {"8": 37}, True),
        lamda_record("lamdapp_r8", "lamdapp", {"3": 1, "8": 30, "9": 6}, False),
        lamda_record("lamda_r8", "lamda", {"8": 8}, True, model="tiny_gpt2"),
        lamda_record("lamdapp_r8", "lamdapp", {"8": 8}, True, model="tiny_gpt2"),
        finetune_record(),
    ]
    cells = cells_of(recs)
    table = tables.family_table(cells, "nlu")
    shown = [c for c in table.columns if c not in ("method",)]

    def row(method, model):
        return table[(table["method"] == method) & (table["model"] == model)].iloc[0]

    differs = row("lamda_r8", "minilm")[shown] != row("lamdapp_r8", "minilm")[shown]
    assert list(differs[differs].index) == ["ranks"]
    assert row("lamda_r8", "minilm")["ranks"] == "8×37"
    assert row("lamdapp_r8", "minilm")["ranks"] == "3×1, 8×30, 9×6"
    assert row("lamdapp_r8", "tiny_gpt2")["ranks"] == "8×8 (uniform)"
    assert row("lora_r8", "minilm")["ranks"] == ""
    note = tables.uniform_allocation_note(cells, "nlu")
    assert note is not None and "lamdapp_r8 on tiny_gpt2 / sst2 (8×8)" in note and "minilm" not in note
    assert tables.uniform_allocation_note(cells_of(recs[:2]), "nlu") is None


def test_a_malformed_rank_histogram_is_refused():
    rec = lamda_record("lamdapp_r8", "lamdapp", {"eight": 3}, False)
    with pytest.raises(tables.TableInputError, match="rank_histogram"):
        tables.finetune_frame([rec])


def test_smoke_checks_hold_lamda_to_the_stated_tolerances():
    small = {"trainable": 10, "updates": 100, "saved": 100}
    recs = [
        finetune_record(method="full", method_type="full", r=None, score=0.95, updates=10**7),
        finetune_record(method="lora_r8", score=0.90, trainable=800, updates=8000, saved=4000),
        # 4.5 points below LoRA: within 5; 9.5 below full: within 10
        finetune_record(method="lamda_r8", method_type="lamda", score=0.855, trainable=400, updates=500),
        # 5.5 points below LoRA: a miss; more updates than LoRA: a miss
        finetune_record(method="lamdapp_r8", method_type="lamdapp", score=0.845, trainable=400, updates=9000),
        # perplexity: relative, lower is better (LoRA 2.0, LaMDA 2.08 = 4% worse: within 5%)
        finetune_record(task="wiki", method="lora_r8", metric="perplexity", score=2.0),
        finetune_record(
            task="wiki", method="lamda_r8", method_type="lamda", metric="perplexity", score=2.08, **small
        ),
    ]
    table, outcomes = tables.smoke_checks(cells_of(recs))
    rows = {(r["task"], r["method"]): r for r in table.to_dict("records")}
    assert rows[("sst2", "lamda_r8")]["LaMDA vs LoRA"] == "-4.5 pts (ok)"
    assert rows[("sst2", "lamda_r8")]["LaMDA vs full FT"] == "-9.5 pts (ok)"
    assert rows[("sst2", "lamda_r8")]["updates LoRA/this"] == "16.00x (ok)"
    assert rows[("sst2", "lamdapp_r8")]["LaMDA vs LoRA"] == "-5.5 pts (MISS)"
    assert rows[("sst2", "lamdapp_r8")]["updates LoRA/this"].endswith("(MISS)")
    assert rows[("wiki", "lamda_r8")]["LaMDA vs LoRA"] == "-4.0 % (ok)"
    assert rows[("wiki", "lamda_r8")]["LoRA vs full FT"] == "—"  # no full FT run on that task
    summary = tables.smoke_checks_summary(outcomes)
    assert "LaMDA within tolerance of LoRA: 2/3 (misses: nlu/sst2/minilm/lamdapp_r8)" in summary
    assert "LoRA within margin of full FT: 1/2" in summary  # one LoRA row, counted once per task
    assert "LaMDA makes fewer parameter updates than LoRA: 2/3" in summary
