"""Figures: the Pareto front, the plotted points, fixed file names and stable bytes."""

import math
from pathlib import Path

import pytest

from lamda_repro import figures, tables


def record(method, method_type, task, score, trainable, r=8, status="success", state=1000):
    return {
        "run_id": f"nlu/{task}/m/{method}/seed0",
        "kind": "finetune",
        "status": status,
        "spec": {
            "experiment": "nlu",
            "family": "nlu",
            "task": task,
            "model": "m",
            "method": method,
            "method_type": method_type,
            "method_params": {"r": r} if r else {},
            "seed": 0,
        },
        "metrics": {"accuracy": score},
        "primary_metric": "accuracy",
        "params": {"trainable": trainable},
        "parameter_updates": trainable,
        "memory": {"peak_bytes": 2**20, "train_state_bytes": state},
    }


def cells(records):
    return tables.cell_summary(tables.finetune_frame(records))


@pytest.mark.parametrize(
    "points, front",
    [
        ([(1, 1), (2, 2), (3, 3)], [0, 1, 2]),  # each costs more and is better
        ([(1, 3), (2, 2), (3, 1)], [0]),  # first dominates all
        ([(1, 1), (2, 3), (3, 2), (4, 4)], [0, 1, 3]),  # (3, 2) is dominated by (2, 3)
        ([(1, 1), (1, 1)], [0, 1]),  # equal points do not dominate each other
        ([(1, 2), (1, 1)], [0]),  # same cost, lower quality is dominated
        ([(math.nan, 5), (2, 1)], [1]),  # NaN never on the front
        ([], []),
    ],
)
def test_pareto_front(points, front):
    assert figures.pareto_front(points) == front


def test_family_points_use_the_table_average():
    recs = [
        record("lora", "lora", "a", 0.8, 1000),
        record("lora", "lora", "b", 0.6, 3000),
        record("lamda", "lamda", "a", 0.7, 10),
    ]
    points = figures.family_points(cells(recs), "nlu", "trainable").set_index("method")
    assert points.loc["lora", "y"] == pytest.approx(70.0)
    assert points.loc["lora", "x"] == pytest.approx(2000)
    assert math.isnan(points.loc["lamda", "y"])  # task b missing: no average


def test_family_figures_have_fixed_names_and_stable_bytes(tmp_path):
    recs = [
        record("lora", "lora", "a", 0.8, 1000),
        record("lamda", "lamda", "a", 0.78, 64),
        record("full", "full", "a", 0.82, 10**6, r=None),
    ]
    written = figures.write_family_figures(cells(recs), "nlu", tmp_path / "one")
    assert sorted(p.split("/")[-1] for p in written) == sorted(figures.figure_names("nlu"))
    again = figures.write_family_figures(cells(recs), "nlu", tmp_path / "two")
    for a, b in zip(written, again, strict=True):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            data = fa.read()
            assert data == fb.read() and len(data) > 1000
    assert open(written[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(written[1], "rb").read(5) == b"%PDF-"


def generation_record(experiment, task, method, metric, score, trainable):
    rec = record(method, "lora", task, score, trainable)
    rec["spec"].update({"experiment": experiment, "family": "generation", "model": f"{experiment}_model"})
    rec["metrics"] = {metric: score}
    rec["primary_metric"] = metric
    return rec


def test_every_successful_run_is_plotted_per_task_where_there_is_no_average():
    # E2E and WikiText-2 are separate experiments: no row has both tasks, so none has an average
    recs = [
        generation_record("e2e", "e2e", "lora", "bleu", 30.0, 1000),
        generation_record("e2e", "e2e", "full", "bleu", 40.0, 10**5),
        generation_record("wiki", "wikitext", "lora", "perplexity", 27.0, 1000),
        generation_record("wiki", "wikitext", "lamda", "perplexity", 39.0, 100),
    ]
    panels = figures.family_panels(cells(recs), "generation", "trainable")
    assert [p.title for p in panels] == ["e2e", "wikitext"]  # no empty average panel
    e2e, wiki = panels
    assert sorted(zip(e2e.points["method"], e2e.points["y"], strict=True)) == [("full", 40.0), ("lora", 30.0)]
    assert wiki.lower_is_better and not e2e.lower_is_better and "lower is better" in wiki.ylabel
    assert sorted(wiki.points["method"]) == ["lamda", "lora"]


def test_a_family_with_averages_gets_an_average_panel_first_and_skips_failed_runs():
    recs = [
        record("lora", "lora", "a", 0.8, 1000),
        record("lora", "lora", "b", 0.6, 3000),
        record("lamda", "lamda", "a", 0.7, 10),
        record("lamda", "lamda", "b", 0.0, 10, status="failed"),
    ]
    panels = figures.family_panels(cells(recs), "nlu", "trainable")
    assert [p.title for p in panels] == ["avg over tasks", "a", "b"]
    assert list(panels[0].points["method"]) == ["lora"]  # lamda has no average (task b failed)
    assert sorted(panels[1].points["method"]) == ["lamda", "lora"] and list(panels[2].points["method"]) == [
        "lora"
    ]
    assert panels[1].points.set_index("method").loc["lamda", "y"] == pytest.approx(70.0)


def test_labels_are_a_legend_not_text_next_to_the_points(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, stem: saved.append(fig) or [])
    recs = [record(f"method_{i}", "lora", "a", 0.8, 1000) for i in range(12)]  # all at one spot
    figures.write_family_figures(cells(recs), "nlu", tmp_path)
    fig = saved[0]
    assert all(not ax.texts for ax in fig.axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [*sorted(f"method_{i}" for i in range(12)), "m", "Pareto front"]
    sizes = [c.get_sizes()[0] for c in fig.axes[0].collections if len(c.get_offsets()) == 1][:12]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # nested, not hidden


def test_figures_without_runs_are_still_written(tmp_path):
    written = figures.write_family_figures(cells([]), "reasoning", tmp_path)
    assert len(written) == 6 and all((tmp_path / p.split("/")[-1]).stat().st_size > 0 for p in written)


CAPTIONS = Path(__file__).resolve().parents[1] / "workflow" / "report"


@pytest.mark.parametrize(
    "name",
    [
        "workflow.rst",
        "table_family.rst",
        "table_measurements.rst",
        "table_runs.rst",
        "figure_quality_params.rst",
        "figure_quality_train_state.rst",
        "figure_quality_peak_memory.rst",
        "claims.rst",
        "table_recursive.rst",
        "figure_recursive.rst",
        "bench.rst",
    ],
)
def test_report_captions_render_without_rst_warnings(name):
    """Captions go through Jinja2 and docutils in `snakemake --report`; both must accept them."""
    import jinja2
    from docutils.core import publish_parts

    class FakeSnakemake:
        config = {"name": "smoke", "scale": "smoke"}
        wildcards = {}

    text = (
        jinja2.Environment(undefined=jinja2.StrictUndefined)
        .from_string((CAPTIONS / name).read_text())
        .render(snakemake=FakeSnakemake)
    )
    html = publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 2})["body"]
    assert len(html) > 100
