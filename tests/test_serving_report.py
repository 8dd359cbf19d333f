"""The paper-geometry estimate (hand-computed), the serving table and figure from a record."""

import json

import pytest

from lamda_repro.recursive.serving.config import PAPER_ESTIMATE_DEFAULTS, latency_table_path
from lamda_repro.recursive.serving.paper import paper_estimate, paper_models
from lamda_repro.recursive.serving.report import plot_threshold_sweep, serving_frame, write_serving_table
from lamda_repro.recursive.serving.simulator import LatencyTable, LatencyTables, SimulatorError


def test_paper_models_of_gemma_2b():
    models = paper_models("gemma-2b", 2, [64], element_bytes=2)
    # non-embedding: 18 layers of 110,104,576 parameters (attention 2048*256*(8+8+1+1), MLP
    # 3*2048*16384, two norms); embedding 256,000 x 2048, tied with the head
    assert models["vanilla"]["non_embedding"] == 18 * 110_104_576 == 1_981_882_368
    assert models["recursive"]["non_embedding"] == 9 * 110_104_576
    assert models["recursive"]["weight_bytes"] == (990_941_184 + 524_288_000) * 2
    assert models["relaxed_r64"]["non_embedding"] == 1_069_387_776  # paper: 1.07B


def _table_file(block_s=1.0, fill_s=0.0):
    plain = LatencyTables(
        embed=LatencyTable([1], [5.0]),  # ignored: the estimate counts blocks (and fills) only
        block=LatencyTable([1, 64], [block_s, block_s]),
        head=LatencyTable([1], [5.0]),
        fill=LatencyTable([1], [fill_s]),
        num_loops=2,
    )
    return {
        "geometry": "gemma-2b",
        "device": "test device",
        "context": 1536,
        "tables": {"plain": plain.to_dict()},
    }


def _cfg(**workload):
    return {
        **PAPER_ESTIMATE_DEFAULTS,
        "workload": {"num_requests": 1, "prompt_len": 8, "gen_len": 11, **workload},
    }


def test_paper_estimate_on_flat_tables_is_hand_computable():
    # one request, 10 decode tokens, a layer costs 1 s at any batch. Vanilla static: 18 layers per
    # token -> 180 s. Recursive with every token leaving after loop 1: 9 layers per token -> 90 s.
    out = paper_estimate(_cfg(), _table_file(), [1.0, 0.0], "hand-made")
    rows = {(r["model"], r["scheduler"], r["early_exit"]): r for r in out["rows"]}
    assert rows[("vanilla", "static", False)]["tokens_per_s"] == pytest.approx(10 / 180)
    assert rows[("recursive", "static", False)]["vs_vanilla_static"] == pytest.approx(1.0)
    assert rows[("recursive", "cdb", True)]["vs_vanilla_static"] == pytest.approx(2.0)
    assert out["speedup_cdb_exit_vs_vanilla_static"] == pytest.approx(2.0)
    # memory-bound batches: (40e9 - weights) / (2 * 18 * 256 * 2 bytes * 19 tokens)
    assert out["models"]["vanilla"]["max_batch"] == int((40e9 - 5_012_340_736) // (2 * 18 * 256 * 2 * 19))
    assert out["exit_distribution_source"] == "hand-made" and out["latency_device"] == "test device"


def test_paper_estimate_counts_the_kv_fill_of_exited_tokens():
    out = paper_estimate(_cfg(), _table_file(fill_s=0.5), [1.0, 0.0], "hand-made")
    cdb = next(
        r for r in out["rows"] if r["model"] == "recursive" and r["scheduler"] == "cdb" and r["early_exit"]
    )
    assert cdb["vs_vanilla_static"] == pytest.approx(180 / (10 * (9 + 9 * 0.5)))


def test_paper_estimate_refuses_an_unknown_geometry():
    with pytest.raises(SimulatorError, match="unknown geometry"):
        paper_estimate(_cfg(), {"geometry": "gpt-7", "tables": {}}, [1.0, 0.0], "x")


def test_the_committed_latency_tables_give_a_paper_estimate():
    path = latency_table_path("results/reference/latency/gemma-2b.cpu.json")
    data = json.loads(path.read_text())
    assert (
        data["geometry"] == "gemma-2b"
        and data["device"]
        and data["tables"]["plain"]["meta"]["context"] == 1536
    )
    out = paper_estimate(_cfg(num_requests=40, gen_len=20), data, [0.8, 0.2], "test")
    assert out["speedup_cdb_exit_vs_vanilla_static"] > 1.0
    assert out["models"]["vanilla"]["extrapolated_beyond_measured_sizes"]


def _record():
    def row(model, kind, scheduler, exit_, measured, simulated):
        return {
            "model": model,
            "kind": kind,
            "scheduler": scheduler,
            "early_exit": exit_,
            "threshold": 0.9 if exit_ else None,
            "max_batch": 8,
            "measured_tokens_per_s": measured,
            "simulated_tokens_per_s": simulated,
            "prediction_error": simulated / measured - 1,
            "measured_vs_vanilla_static": measured / 100.0,
            "simulated_vs_vanilla_static": simulated / 110.0,
            "quality": {"perplexity": 3.5, "average": 0.75, "mean_loops": 1.5} if kind != "vanilla" else None,
        }

    return {
        "kind": "serving",
        "status": "success",
        "workload": {"num_requests": 8, "prompt_len": [4, 8], "gen_len": 16, "arrival": "burst"},
        "throughput": {"device": "cpu (test)"},
        "greedy_outputs_match": {"tiny--full": True, "tiny--rt": True},
        "results": [
            row("tiny--full", "vanilla", "static", False, 100.0, 110.0),
            row("tiny--rt", "recursive", "cdb", True, 150.0, 160.0),
        ],
        "sweep": [
            {
                "model": "tiny--rt",
                "rule": "confidence",
                "threshold": t,
                "simulated_vs_vanilla_static": s,
                "perplexity": p,
            }
            for t, s, p in ((0.6, 1.6, 3.6), (0.9, 1.4, 3.5))
        ],  # fmt: skip
    }


def test_serving_table_puts_measured_and_simulated_side_by_side(tmp_path):
    write_serving_table(_record(), tmp_path / "serving")
    md = (tmp_path / "serving.md").read_text()
    assert "| Measured tok/s | Measured ΔV | Simulated tok/s | Simulated ΔV | Sim. error |" in md
    assert "x1.50" in md and "+7%" in md and "CDB + exit (0.90)" in md and "cpu (test)" in md
    assert "tiny--rt yes" in md
    assert "\\toprule" in (tmp_path / "serving.tex").read_text()
    assert len(serving_frame(_record())) == 2
    assert (tmp_path / "serving.csv").read_text().count("\n") == 3


def test_a_failed_benchmark_still_gets_a_table(tmp_path):
    write_serving_table(
        {"kind": "serving", "status": "failed", "error": "ServingRunError: boom"}, tmp_path / "s"
    )
    assert "failed: ServingRunError: boom" in (tmp_path / "s.md").read_text()


def test_threshold_figure_is_written(tmp_path):
    out = plot_threshold_sweep(_record(), tmp_path / "fig.png")
    assert out.stat().st_size > 5_000
    assert plot_threshold_sweep({"sweep": []}, tmp_path / "empty.png").exists()


def test_paper_rows_show_the_papers_speedup_next_to_the_estimate(tmp_path, repo_root):
    from lamda_repro.claims import load_reference

    record = {**_record(), "paper_estimate": paper_estimate(_cfg(), _table_file(), [1.0, 0.0], "hand-made")}
    reference = load_reference(repo_root / "results" / "reference" / "papers.yaml")
    frame = write_serving_table(record, tmp_path / "serving", reference)
    paper = frame[frame["setting"].str.startswith("paper")].set_index(["model", "scheduler", "early_exit"])
    assert paper.loc[("recursive", "cdb", True), "paper_vs_vanilla_static"] == 2.66
    assert paper.loc[("recursive", "cdb", True), "simulated_vs_vanilla_static"] == pytest.approx(2.0)
    assert paper.loc[("vanilla", "csb", False), "paper_vs_vanilla_static"] == 1.41
    assert "x2.66" in (tmp_path / "serving.md").read_text()
