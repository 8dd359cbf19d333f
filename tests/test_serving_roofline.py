"""The roofline latency model: hand computations for two layer shapes, its tables in the
simulator (CDB gains grow with the exit rate), the paper-geometry rows on A100 and H100."""

import pytest

from lamda_repro.recursive.serving.config import PAPER_ESTIMATE_DEFAULTS
from lamda_repro.recursive.serving.latency import GEOMETRIES
from lamda_repro.recursive.serving.paper import PAPER_ROWS, paper_estimate, roofline_estimates
from lamda_repro.recursive.serving.report import serving_frame
from lamda_repro.recursive.serving.roofline import (
    ACCELERATORS,
    LAUNCH_OVERHEAD_S,
    accelerator,
    fill_call_cost,
    layer_call_cost,
    layer_maps,
    lora_delta_parameters,
    roofline_table_file,
)
from lamda_repro.recursive.serving.simulator import LatencyTables

TINY = {"hidden_size": 8, "num_heads": 2, "num_kv_heads": 1, "head_dim": 4, "intermediate_size": 16}
A100, H100 = ACCELERATORS["a100-40gb"], ACCELERATORS["h100-sxm"]


def test_the_data_sheet_numbers():
    assert (A100.peak_flops, A100.bandwidth, A100.memory_bytes) == (312e12, 1555e9, 40e9)
    assert (ACCELERATORS["a100-80gb"].bandwidth, ACCELERATORS["a100-80gb"].memory_bytes) == (2039e9, 80e9)
    assert (H100.peak_flops, H100.bandwidth, H100.memory_bytes) == (989.5e12, 3.35e12, 80e9)
    assert all("data sheet" in acc.source for acc in ACCELERATORS.values())
    with pytest.raises(ValueError, match="unknown accelerator 'tpu'"):
        accelerator("tpu")


def test_tiny_layer_by_hand():
    # maps (in, out): q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8
    # W = 64 + 32 + 32 + 64 + 128 + 128 + 128 = 576; sum of (in + out) = 16+12+12+16+24+24+24 = 128
    cost = layer_call_cost(TINY, n=3, context=10, element_bytes=2)
    assert cost.flops == 2 * 3 * 576 + 4 * 3 * 2 * 4 * 10 == 4416  # matmuls + QK^T and PV
    # weights + two norm vectors + activations + KV read (k and v, 1 head of 4, 10 tokens, 3 items)
    assert cost.bytes == 2 * (576 + 2 * 8 + 3 * 128 + 2 * 3 * 1 * 4 * 10) == 2432
    assert cost.seconds(A100) == pytest.approx(2432 / 1555e9 + LAUNCH_OVERHEAD_S, rel=1e-12)
    assert cost.seconds(A100, launch_overhead_s=0) == pytest.approx(2432 / 1555e9, rel=1e-12)
    # depth-wise LoRA of rank 2: r (in + out) per map = 2 x 128 = 256 per depth; items at 2 depths
    delta = lora_delta_parameters(layer_maps(TINY), 2)
    assert sum(delta.values()) == 256
    lora = layer_call_cost(TINY, n=3, context=10, element_bytes=2, delta=delta, depths=2)
    assert lora.flops == 4416 + 2 * 3 * 256
    assert lora.bytes == 2 * (576 + 16 + 2 * 256 + 2 * 3 * 128 + 240) == 4224
    # a depth present reads its delta once; more depths than items cannot be present
    one_item = layer_call_cost(TINY, 1, 10, 2, delta)
    assert layer_call_cost(TINY, 1, 10, 2, delta, depths=2).bytes == one_item.bytes
    # fill rows: input norm, k and v maps (8x4 each), 5 rows
    fill = fill_call_cost(TINY, 5, element_bytes=2)
    assert (fill.flops, fill.bytes) == (2 * 5 * 64, 2 * (64 + 5 * 24 + 8))
    assert layer_call_cost(TINY, 0, 10).seconds(A100) == LAUNCH_OVERHEAD_S


def test_gemma_2b_layer_by_hand_memory_and_compute_bound():
    gemma = GEOMETRIES["gemma-2b"]
    # W = 2048*2048*2 (q, o) + 2048*256*2 (k, v) + 2048*16384*3 (MLP) = 110,100,480
    # sum of (in + out) = 4096*2 + 2304*2 + 18432*3 = 68,096
    cost = layer_call_cost(gemma, n=512, context=1536, element_bytes=2)
    flops = 2 * 512 * 110_100_480 + 4 * 512 * 8 * 256 * 1536
    nbytes = 2 * (110_100_480 + 2 * 2048 + 512 * 68_096 + 2 * 512 * 1 * 256 * 1536)
    assert (cost.flops, cost.bytes) == (flops, nbytes) == (119_185_342_464, 1_095_245_824)
    # memory-bound on an H100 (0.327 ms of HBM traffic against 0.120 ms of tensor work)
    assert cost.seconds(H100) == pytest.approx(1_095_245_824 / 3.35e12 + 10e-6, rel=1e-12)
    # without KV (context 0) the same batch is compute-bound on an A100: 0.361 ms > 0.186 ms
    short = layer_call_cost(gemma, n=512, context=0, element_bytes=2)
    assert short.flops == 2 * 512 * 110_100_480
    assert short.bytes / A100.bandwidth < short.flops / A100.peak_flops
    assert short.seconds(A100) == pytest.approx(112_742_891_520 / 312e12 + 10e-6, rel=1e-12)


def test_roofline_table_file_is_a_latency_table_file():
    data = roofline_table_file("gemma-2b", "a100-40gb", 1536, [1, 2, 4, 300], 2, [64])
    assert data["device"] == "roofline estimate: NVIDIA A100 40GB SXM"
    plain = LatencyTables.from_dict(data["tables"]["plain"])
    lora = LatencyTables.from_dict(data["tables"]["lora_r64"])
    gemma = GEOMETRIES["gemma-2b"]
    assert plain.block(4) == layer_call_cost(gemma, 4, 1536).seconds(A100)
    assert plain.block_mixed is None and plain.embed(100) == plain.head(100) == 0.0
    assert lora.block_mixed(300) > lora.block(300) > plain.block(300)  # two depths' LoRAs, one
    assert plain.fill(2) == fill_call_cost(gemma, 2).seconds(A100)
    # flat in the batch while memory-bound: 300 items cost far less than 300 single calls
    assert plain.block(300) < 0.5 * 300 * plain.block(1)


def _cfg(roofline=("a100-40gb", "h100-sxm"), num_requests=48, gen_len=16):
    return {
        **PAPER_ESTIMATE_DEFAULTS,
        "roofline": list(roofline),
        "lora_ranks": [64],
        "workload": {"num_requests": num_requests, "prompt_len": 512, "gen_len": gen_len},
    }


def test_cdb_gains_grow_with_the_exit_rate():
    # the simulator on A100 roofline tables of Gemma 2B (vanilla: 18 layers per call; recursive:
    # 9 per call, 2 loops), both at a batch of 16, a queue of 64 requests of 512 + 12 tokens
    from lamda_repro.recursive.serving.config import workload_from
    from lamda_repro.recursive.serving.paper import model_tables
    from lamda_repro.recursive.serving.simulator import simulate

    workload = workload_from({"num_requests": 64, "prompt_len": 512, "gen_len": 12}, "test")
    data = roofline_table_file("gemma-2b", "a100-40gb", 518, list(range(1, 17)), 2, [])
    layer = LatencyTables.from_dict(data["tables"]["plain"])
    vanilla = simulate("static", workload, model_tables(layer, 18, 1), 16).tokens_per_s
    recursive = model_tables(layer, 9, 2)
    without = simulate("cdb", workload, recursive, 16).tokens_per_s
    gains = [
        simulate("cdb", workload, recursive, 16, [early, 1 - early]).tokens_per_s / vanilla
        for early in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert gains[0] == pytest.approx(without / vanilla, rel=1e-9)  # nobody leaves early
    assert all(b > a for a, b in zip(gains, gains[1:], strict=False)), gains
    assert gains[-1] > 1.5 * gains[0]


def test_paper_geometry_rows_on_a100_and_h100_beside_the_paper():
    from lamda_repro.claims import load_reference
    from lamda_repro.recursive.serving.config import latency_table_path

    estimates = roofline_estimates(_cfg(), "gemma-2b", [0.85, 0.15], "test")
    assert [e["accelerator"]["key"] for e in estimates] == ["a100-40gb", "h100-sxm"]
    for e in estimates:
        assert e["estimate"] == "roofline estimate" and e["latency_context"] == 512 + 8
        assert e["memory_budget_gb"] == e["accelerator"]["memory_bytes"] / 1e9
        kinds = {(r["model"].split("_")[0], r["scheduler"], r["early_exit"]) for r in e["rows"]}
        assert kinds == set(PAPER_ROWS)
    # the larger H100 memory holds more sequences
    assert estimates[1]["models"]["vanilla"]["max_batch"] > estimates[0]["models"]["vanilla"]["max_batch"]
    reference = load_reference(latency_table_path("results/reference/papers.yaml"))
    frame = serving_frame({"results": [], "paper_roofline": estimates}, reference)
    a100 = frame[frame["setting"] == "paper geometry gemma-2b: roofline estimate, NVIDIA A100 40GB SXM"]
    h100 = frame[frame["setting"] == "paper geometry gemma-2b: roofline estimate, NVIDIA H100 SXM"]
    assert len(a100) == len(h100) == len(PAPER_ROWS)
    keys = a100["model"] + "/" + a100["scheduler"] + a100["early_exit"].map(str)
    paper = dict(zip(keys, a100["paper_vs_vanilla_static"], strict=True))
    assert paper["recursive/cdbTrue"] == 2.66 and paper["relaxed_r64/cdbTrue"] == 2.00
    assert paper["vanilla/csbFalse"] == 1.41 and paper["vanilla/staticFalse"] == 1.00


def test_a_table_file_estimate_and_the_roofline_agree_on_the_roofline_tables():
    # the roofline tables fed to the generic estimate give the same rows as roofline_estimates
    cfg = _cfg(["h100-sxm"])
    (est,) = roofline_estimates(cfg, "gemma-2b", [0.5, 0.5], "test")
    data = roofline_table_file("gemma-2b", "h100-sxm", 520, list(range(1, 2000)), 2, [64])
    again = paper_estimate(cfg, data, [0.5, 0.5], "test", PAPER_ROWS, 80.0)
    expected = [r["tokens_per_s"] for r in est["rows"]]
    assert [r["tokens_per_s"] for r in again["rows"]] == pytest.approx(expected)
