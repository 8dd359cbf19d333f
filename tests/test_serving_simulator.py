"""Schedulers and the throughput simulator on hand-made inputs with hand-computed answers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamda_repro.recursive.serving.scheduler import (
    Workload,
    WorkloadError,
    make_workload,
    run_schedule,
)
from lamda_repro.recursive.serving.simulator import (
    LatencyTable,
    LatencyTables,
    SimulatedBackend,
    SimulatorError,
    depthwise_speedup_bound,
    median_tables,
    memory_bound_batch,
    prediction_error,
    simulate,
)

ZERO = LatencyTable([1], [0.0])


def tables(block, num_loops=2, embed=ZERO, head=ZERO, fill=ZERO, mixed=None):
    return LatencyTables(
        embed=embed, block=block, head=head, fill=fill, block_mixed=mixed, num_loops=num_loops
    )


def lockstep(requests=4, gen=5, prompt=3):
    return Workload((prompt,) * requests, (gen,) * requests, (0.0,) * requests)


# -- latency tables -----------------------------------------------------------------------------


def test_latency_table_interpolates_and_extrapolates_linearly():
    t = LatencyTable([1, 2, 4], [1.0, 1.5, 2.5])
    assert t(0) == 0.0
    assert t(1) == 1.0 and t(3) == 2.0  # halfway between 1.5 and 2.5
    assert t(8) == pytest.approx(2.5 + 0.5 * 4)  # slope of the last two points: 0.5 per item
    assert LatencyTable([4, 8], [2.0, 3.0])(2) == 2.0  # below the first size: the first time


def test_block_time_between_uniform_and_mixed_depths():
    t = tables(LatencyTable([1], [1.0]), num_loops=3, mixed=LatencyTable([1], [2.0]))
    assert t.block_time(5, groups=1) == 1.0
    assert t.block_time(5, groups=2) == pytest.approx(1.5)
    assert t.block_time(5, groups=3) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "sizes,seconds", [([], []), ([2, 1], [1.0, 1.0]), ([0, 1], [1.0, 1.0]), ([1], [math.nan])]
)
def test_malformed_latency_tables_are_refused(sizes, seconds):
    with pytest.raises(SimulatorError):
        LatencyTable(sizes, seconds)


def test_latency_tables_round_trip_through_a_dict():
    t = tables(LatencyTable([1, 4], [1.0, 2.0]), mixed=LatencyTable([1, 4], [1.5, 3.0]))
    back = LatencyTables.from_dict(t.to_dict())
    assert back.block_time(4, 2) == 3.0 and back.num_loops == 2
    with pytest.raises(SimulatorError, match="lack"):
        LatencyTables.from_dict({"block": {"sizes": [1], "seconds": [1.0]}})


# -- hand-computed schedules --------------------------------------------------------------------


def test_without_exits_cdb_equals_csb_on_a_recursive_model():
    # 4 requests, 4 decode tokens each, batch 2, B = 2, a block call costs 1 s at any batch:
    # CSB: 2 calls per step, 4 steps per pair of requests -> 16 s for 16 tokens; CDB: one call
    # per step, a token every 2 steps -> the same 16 s.
    t = tables(LatencyTable([1], [1.0]))
    csb = simulate("csb", lockstep(), t, max_batch=2)
    cdb = simulate("cdb", lockstep(), t, max_batch=2)
    assert csb.decode_tokens == cdb.decode_tokens == 16
    assert csb.decode_time_s == cdb.decode_time_s == 16.0
    assert csb.tokens_per_s == cdb.tokens_per_s == 1.0


def test_without_exits_cdb_equals_csb_with_batch_dependent_costs():
    t = tables(
        LatencyTable([1, 2, 4], [1.0, 1.2, 2.0]),
        embed=LatencyTable([1, 2], [0.1, 0.2]),
        head=LatencyTable([1, 2], [0.3, 0.6]),
    )
    wl = lockstep(requests=8, gen=7)
    assert simulate("cdb", wl, t, 4).decode_time_s == pytest.approx(simulate("csb", wl, t, 4).decode_time_s)


def test_every_token_leaving_after_loop_one_of_two_gives_the_bound():
    # all exit after loop 1 of B = 2: a CDB step (one call) gives a token per item, twice what
    # the same model gives without exit: the bound B / E[loops] = 2.
    t = tables(LatencyTable([1], [1.0]))
    no_exit = simulate("csb", lockstep(), t, max_batch=2)
    exit_all = simulate("cdb", lockstep(), t, max_batch=2, exit_distribution=[1.0, 0.0])
    assert exit_all.decode_time_s == 8.0
    assert exit_all.tokens_per_s / no_exit.tokens_per_s == 2.0 == depthwise_speedup_bound(2, [1.0, 0.0])


def test_speedup_bound_is_b_over_mean_loops():
    assert depthwise_speedup_bound(2, [0.5, 0.5]) == pytest.approx(2 / 1.5)
    assert depthwise_speedup_bound(3, [0.0, 0.0, 1.0]) == 1.0
    with pytest.raises(SimulatorError):
        depthwise_speedup_bound(2, [0.7, 0.7])


def test_exits_only_pay_off_when_freed_depth_is_refilled():
    # flat block cost: CSB with exits still runs loop 2 for the items that did not leave, so a
    # step costs 2 calls unless every item left; CDB refills at once.
    t = tables(LatencyTable([1], [1.0]))
    wl = lockstep(requests=2, gen=101)
    csb = simulate("csb", wl, t, 2, exit_distribution=[0.5, 0.5], seed=1)
    cdb = simulate("cdb", wl, t, 2, exit_distribution=[0.5, 0.5], seed=1)
    assert csb.tokens_per_s < cdb.tokens_per_s
    assert cdb.tokens_per_s / simulate("csb", wl, t, 2).tokens_per_s == pytest.approx(4 / 3, rel=0.1)


def test_a_freed_slot_is_refilled_for_the_next_call():
    # one slot, two requests of two decode tokens each, CDB without exit: the call after the
    # first request's last loop already carries the second request at loop 0.
    wl = Workload((2, 2), (3, 3), (0.0, 0.0))
    result = simulate("cdb", wl, tables(LatencyTable([1], [1.0])), max_batch=1, trace=True)
    assert result.trace == [([0], [0]), ([0], [1]), ([0], [0]), ([0], [1])] * 2
    assert result.block_call_sizes == [1] * 8 and result.refills == 1


def test_an_exited_item_restarts_at_loop_zero_in_the_next_call():
    wl = Workload((2, 2), (4, 4), (0.0, 0.0))
    result = simulate(
        "cdb", wl, tables(LatencyTable([1], [1.0])), 2, exit_distribution=[1.0, 0.0], trace=True
    )
    assert result.trace == [([0, 1], [0, 0])] * 3  # every token leaves after loop 1, no idle depth


def test_static_batching_waits_for_the_whole_batch():
    # batch 2, decode lengths 1 and 3, then a third request: static runs 3 steps with a shrinking
    # batch before admitting it, CSB admits it as soon as the short request finishes.
    wl = Workload((1, 1, 1), (2, 4, 2), (0.0, 0.0, 0.0))
    t = tables(LatencyTable([1], [1.0]), num_loops=1)
    static = simulate("static", wl, t, 2, trace=True)
    csb = simulate("csb", wl, t, 2, trace=True)
    assert [len(s) for s, _ in static.trace] == [2, 1, 1, 1]
    assert [len(s) for s, _ in csb.trace] == [2, 2, 1]
    assert static.decode_time_s == 4.0 and csb.decode_time_s == 3.0


@settings(max_examples=40, deadline=None)
@given(
    scheduler=st.sampled_from(["static", "csb", "cdb"]),
    max_batch=st.integers(1, 6),
    gens=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    loops=st.integers(1, 3),
    exit_first=st.floats(0.0, 1.0),
    seed=st.integers(0, 5),
)
def test_no_call_exceeds_the_maximum_batch_and_every_token_is_produced(
    scheduler, max_batch, gens, loops, exit_first, seed
):
    wl = Workload((4,) * len(gens), tuple(gens), (0.0,) * len(gens))
    dist = None if loops == 1 else [exit_first, *([0.0] * (loops - 2)), 1.0 - exit_first]
    result = simulate(scheduler, wl, tables(LatencyTable([1, 8], [1.0, 2.0]), loops), max_batch, dist, seed)
    assert result.max_call_size <= max_batch
    assert result.decode_tokens == wl.decode_tokens == sum(gens) - len(gens)
    assert sum(result.exits_per_loop) == wl.decode_tokens


def test_poisson_arrivals_idle_the_clock_until_the_next_request():
    wl = Workload((1, 1), (2, 2), (0.0, 10.0))
    result = simulate("csb", wl, tables(LatencyTable([1], [1.0]), 1), 4)
    assert result.decode_time_s == 11.0  # 1 s of work, idle until 10 s, 1 s of work


def test_simulated_exits_follow_the_seed():
    wl = lockstep(requests=6, gen=30)
    t = tables(LatencyTable([1], [1.0]))
    a = simulate("cdb", wl, t, 3, [0.3, 0.7], seed=4)
    b = simulate("cdb", wl, t, 3, [0.3, 0.7], seed=4)
    assert a.exits_per_loop == b.exits_per_loop and a.decode_time_s == b.decode_time_s
    assert abs(a.exits_per_loop[0] / sum(a.exits_per_loop) - 0.3) < 0.15


def test_simulated_backend_rejects_a_bad_distribution():
    with pytest.raises(SimulatorError, match="summing to 1"):
        SimulatedBackend(tables(ZERO), 2, 2, [0.5, 0.6])


# -- workload, memory, errors -------------------------------------------------------------------


def test_workloads_are_seeded_and_bounded():
    a = make_workload(20, [3, 9], [1, 5], seed=2)
    assert a == make_workload(20, [3, 9], [1, 5], seed=2) != make_workload(20, [3, 9], [1, 5], seed=3)
    assert all(3 <= p <= 9 for p in a.prompt_lens) and all(1 <= g <= 5 for g in a.gen_lens)
    poisson = make_workload(5, 4, 4, arrival="poisson", rate=2.0, seed=0)
    assert list(poisson.arrivals) == sorted(poisson.arrivals) and poisson.arrivals[0] > 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_requests": 0}, "num_requests: must be >= 1"),
        ({"prompt_len": 0}, "prompt_len"),
        ({"gen_len": [5, 2]}, "gen_len"),
        ({"arrival": "poisson"}, "rate"),
        ({"arrival": "sometimes"}, "arrival"),
    ],
)
def test_bad_workloads_raise_one_line_errors(kwargs, message):
    args = {"num_requests": 3, "prompt_len": 4, "gen_len": 4, **kwargs}
    with pytest.raises(WorkloadError, match=message) as info:
        make_workload(**args)
    assert "\n" not in str(info.value)


def test_a_maximum_batch_below_one_is_refused():
    with pytest.raises(WorkloadError, match="max_batch"):
        run_schedule("csb", lockstep(), SimulatedBackend(tables(ZERO), 2, 1), 0)


def test_memory_bound_batch_is_what_fits_next_to_the_weights():
    assert memory_bound_batch(100, 30, 7) == 10  # floor(70 / 7)
    assert memory_bound_batch(100, 30, 7, cap=4) == 4
    with pytest.raises(SimulatorError, match="no room"):
        memory_bound_batch(100, 98, 7)


def test_prediction_error_is_relative_to_the_measurement():
    assert prediction_error(1.2, 1.0) == pytest.approx(0.2)
    assert np.isnan(prediction_error(1.0, 0.0))


def test_tables_of_several_rounds_combine_by_median():
    rounds = [
        LatencyTables(
            embed=ZERO, block=LatencyTable([1, 2], [b, 2 * b]), head=ZERO, fill=ZERO, step_s={"csb": s}
        )
        for b, s in ((1.0, 0.1), (3.0, 0.3), (2.0, 0.2))
    ]
    combined = median_tables(rounds)
    assert combined.block.seconds == [2.0, 4.0] and combined.step_s == {"csb": 0.2}
    assert combined.meta["rounds"] == 3


def test_scheduler_bookkeeping_is_charged_per_step():
    t = tables(LatencyTable([1], [1.0]))
    t.step_s = {"csb": 0.5, "cdb": 0.25}
    csb, cdb = simulate("csb", lockstep(), t, 2), simulate("cdb", lockstep(), t, 2)
    assert csb.decode_time_s == 16.0 + 0.5 * csb.steps and cdb.decode_time_s == 16.0 + 0.25 * cdb.steps
