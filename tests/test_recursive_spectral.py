"""Spectral relaxations (lamda_depth, shared_basis): exactness, the B = 1 identity, the cores'
formula, counts, save/load with shared bases stored once, what trains, budgets and bad input."""

import pytest
import torch

from lamda_repro.recursive import spectral
from lamda_repro.recursive.convert import (
    RecursiveConfigError,
    convert_to_recursive,
    decoder_layers,
    load_recursive,
    save_recursive,
    unique_state_dict,
)
from lamda_repro.recursive.counts import model_non_embedding_parameters, non_embedding_counts
from lamda_repro.recursive.relax import (
    DepthLoRALinear,
    DepthRelaxedLinear,
    DepthSpectralLinear,
    RelaxationSpec,
    relaxation_parameters,
    relaxation_ranks,
    relaxed_maps,
    weight_out_in,
)
from lamda_repro.recursive.tiny import tiny_causal_lm, tiny_config
from lamda_repro.recursive.uptrain import UptrainConfig, train_causal_lm

ARCHS = ["llama", "gemma", "gpt_neox", "gpt2"]
KINDS = ["lora", "lamda_depth", "shared_basis"]
SHAPE = dict(vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48)
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def _model(arch="llama", num_layers=4, seed=0):
    torch.manual_seed(seed)
    model = tiny_causal_lm(arch, num_layers=num_layers, **SHAPE)
    with torch.no_grad():  # distinct norm weights and biases per layer
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _relaxed(model, kind, loops=2, init="average", **relax):
    return convert_to_recursive(
        model, loops, init=init, relaxation={"kind": kind, "per_position_vectors": True, **relax}
    )


def _max_logit_error(model, reference):
    with torch.no_grad():
        return (model(IDS).logits - reference(IDS).logits).abs().max().item()


def _full_rank(kind, model, loops):
    """The largest rank any map's residuals allow (shared_basis: the stacked residuals' rank)."""
    maps = {n: (i, o) for n, (i, o) in _maps(model).items()}
    return spectral.max_level(kind, spectral.units_of(kind, maps, len(decoder_layers(model)), loops))


def _maps(model):
    from lamda_repro.recursive.relax import map_shapes

    return map_shapes(decoder_layers(model)[0])


# -- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_relaxation_reproduces_the_original_logits(arch, kind):
    model = _model(arch)
    relaxed = _relaxed(model, kind, init="random", rank=_full_rank(kind, model, 2))
    assert relaxation_ranks(relaxed)  # every map relaxed
    assert _max_logit_error(relaxed, model) < 1e-4
    assert _max_logit_error(convert_to_recursive(model, 2, init="random"), model) > 1e-2


def test_shared_basis_needs_the_stacked_rank_which_exceeds_min_of_the_shape():
    model = _model("llama")
    # random init: independent residuals, so [D_1; D_2] of k_proj (32 -> 16) has rank 32 > 16.
    exact = _relaxed(model, "shared_basis", init="random", rank=64)
    k_ranks = relaxation_ranks(exact)["0/self_attn.k_proj"]
    assert k_ranks == [16, 32] and k_ranks[1] > min(32, 16)
    assert _max_logit_error(exact, model) < 1e-4
    capped = _relaxed(model, "shared_basis", init="random", rank=32, rank_in=16)
    assert _max_logit_error(capped, model) > 1e-3


def test_per_matrix_residuals_are_exact_at_their_caps_for_random_matrices():
    g = torch.Generator().manual_seed(0)
    residuals = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    caps = spectral.rank_caps("shared_basis", d_in=4, d_out=6, num_depths=3)
    assert caps == (6, 4)
    decomposition = spectral.Decomposition("shared_basis", residuals, caps)
    for d, approx in zip(residuals, decomposition.approximations(*caps), strict=True):
        assert torch.allclose(approx, d, atol=1e-12)
    curve = decomposition.energy_curve()
    total = sum(float(d.pow(2).sum()) for d in residuals)
    assert curve[0] == 0 and abs(float(curve[-1]) - total) < 1e-9
    assert all(curve[i] <= curve[i + 1] + 1e-12 for i in range(len(curve) - 1))


def test_weight_error_shrinks_as_the_rank_grows_for_every_kind():
    model = _model("llama")
    for kind in KINDS:
        errors = [_weight_error(_relaxed(model, kind, init="random", rank=r), model) for r in (1, 4, 16, 64)]
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6 < errors[0], kind


# -- the math of the factors ---------------------------------------------------------------------


def test_shared_basis_with_one_loop_equals_lamda_depth():
    model = _model("llama")
    lamda = _relaxed(model, "lamda_depth", loops=1, init="random", rank=5)
    shared = _relaxed(model, "shared_basis", loops=1, init="random", rank=5)
    for a, b in zip(decoder_layers(lamda), decoder_layers(shared), strict=True):
        for name, ma in relaxed_maps(a).items():
            mb = relaxed_maps(b)[name]
            assert torch.equal(ma.basis_U, mb.basis_U) and torch.equal(ma.basis_Vt, mb.basis_Vt)
            assert torch.allclose(ma.core_S, mb.core_S, atol=1e-5)
            assert torch.count_nonzero(ma.core_S - torch.diag(torch.diagonal(ma.core_S))) == 0
    assert _max_logit_error(lamda, shared) < 1e-5


def test_cores_are_the_residuals_projected_on_the_shared_bases():
    model = _model("llama", num_layers=6)
    relaxed = _relaxed(model, "shared_basis", loops=3, init="average", rank=7, rank_in=5)
    layers, originals = decoder_layers(relaxed), decoder_layers(model)
    for position in range(6):
        for name, module in relaxed_maps(layers[position]).items():
            residual = (
                weight_out_in(originals[position].get_submodule(name)).double()
                - weight_out_in(module.base_layer).double()
            )
            U, Vt = module.basis_U.double(), module.basis_Vt.double()
            assert torch.allclose(module.core_S.double(), U.T @ residual @ Vt.T, atol=1e-5)
            assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-5)


def test_lamda_depth_starts_where_lora_starts_at_the_same_rank():
    model = _model("llama")
    lora = _relaxed(model, "lora", rank=3)
    lamda = _relaxed(model, "lamda_depth", rank=3)
    for a, b in zip(decoder_layers(lora), decoder_layers(lamda), strict=True):
        for name, module in relaxed_maps(a).items():
            assert torch.allclose(module.delta_weight(), relaxed_maps(b)[name].delta_weight(), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_offers_the_depth_delta_interface(kind):
    relaxed = _relaxed(_model("llama"), kind, rank=3)
    for layer in decoder_layers(relaxed):
        for module in relaxed_maps(layer).values():
            assert isinstance(module, DepthRelaxedLinear) and module.kind == kind
            d_in = weight_out_in(module.base_layer).shape[1]
            x = torch.randn(2, 5, d_in, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                assert torch.equal(module(x), module.base_layer(x) + module.delta(x))
                dense = x @ module.delta_weight().T
                assert torch.allclose(module.delta(x), dense, atol=1e-5)
            expected = DepthLoRALinear if kind == "lora" else DepthSpectralLinear
            assert isinstance(module, expected)


# -- storage, counts, gradients ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_are_bit_identical_and_store_shared_bases_once(tmp_path, arch, kind):
    model = _model(arch, num_layers=6)
    relaxed = convert_to_recursive(model, 3, init="average", relaxation={"kind": kind, "budget": 3000})
    save_recursive(relaxed, tmp_path)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "model.safetensors"))
    bases = [k for k in stored if k.endswith(("basis_U", "basis_Vt"))]
    if kind == "shared_basis":  # one U and one V per shared layer (2) and map
        assert len(bases) == 2 * 2 * len(_maps(model))
        assert all(k.split(".")[2] in ("0", "1") for k in bases)  # the owners' positions
    loaded = load_recursive(tmp_path)
    original_state, loaded_state = unique_state_dict(relaxed), unique_state_dict(loaded)
    assert set(original_state) == set(loaded_state) == set(stored)
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, relaxed(IDS).logits)
    if kind == "shared_basis":
        first, third = (relaxed_maps(layer) for layer in decoder_layers(loaded)[0:3:2])
        for name, module in first.items():  # positions 0 and 2 share layer 0 (cycle, K = 2)
            assert module.basis_U is third[name].basis_U and module.basis_Vt is third[name].basis_Vt
            assert module.core_S is not third[name].core_S


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_counts_equal_the_built_models(arch, kind):
    model = _model(arch, num_layers=6)
    relaxed = convert_to_recursive(
        model, 3, relaxation={"kind": kind, "rank": 40, "rank_in": 9 if kind == "shared_basis" else None}
    )
    counts = non_embedding_counts(
        tiny_config(arch, num_layers=6, **SHAPE),
        num_loops=3,
        lora_rank=40,
        relaxation=kind,
        rank_in=9 if kind == "shared_basis" else None,
    )
    assert model_non_embedding_parameters(relaxed) == counts["relaxed"]
    assert relaxation_parameters(relaxed) == counts["relaxation"]


def test_counts_follow_the_formulas_on_the_smoke_geometry():
    # hidden 64, 6 layers, KV 32, MLP 128 (the smoke model): per layer sum(d_in + d_out) = 1024.
    config = tiny_config(
        "llama", vocab_size=32, hidden_size=64, num_layers=6, num_kv_heads=2, intermediate_size=128
    )
    lora = non_embedding_counts(config, 2, lora_rank=4)["relaxation"]
    lamda = non_embedding_counts(config, 2, lora_rank=3, relaxation="lamda_depth")["relaxation"]
    shared = non_embedding_counts(config, 2, lora_rank=7, relaxation="shared_basis")["relaxation"]
    assert lora == 6 * 4 * 1024 == 24576
    assert lamda == 6 * (3 * 1024 + 7 * 3 * 3) == 18810
    assert shared == 3 * (7 * 1024 + 7 * 2 * 7 * 7) == 23562
    # k/v (64 -> 32) at rank 64: U capped at 32, V at min(64, 2 * 32) = 64.
    k_only = non_embedding_counts(
        config, 2, lora_rank=64, relaxation="shared_basis", target_modules=["self_attn.k_proj"]
    )
    assert k_only["relaxation"] == 3 * (32 * 32 + 64 * 64 + 2 * 32 * 64)


@pytest.mark.parametrize("kind", ["lamda_depth", "shared_basis"])
def test_only_the_cores_train_unless_the_config_says_more(kind):
    model = _model("llama")
    relaxed = _relaxed(model, kind, rank=3)
    trainable = {n for n, p in relaxed.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("core_S") for n in trainable)
    before = {n: p.detach().clone() for n, p in relaxed.named_parameters()}
    batches = iter([IDS] * 3)
    train_causal_lm(relaxed, batches, UptrainConfig(steps=3, batch_size=2, seq_len=9, warmup_steps=1))
    moved = {n for n, p in relaxed.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable
    wider = _relaxed(model, kind, rank=3, train=["model", "cores"])
    names = {n for n, p in wider.named_parameters() if p.requires_grad}
    assert any(n.endswith("core_S") for n in names) and "model.embed_tokens.weight" in names
    assert not any(n.endswith(("basis_U", "basis_Vt")) for n in names)


# -- budgets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_budget_gives_the_largest_uniform_rank_that_fits(kind):
    model = _model("llama")
    relaxed = convert_to_recursive(model, 2, relaxation={"kind": kind, "budget": 5000})
    used = relaxation_parameters(relaxed)
    level = max(r[0] for r in relaxation_ranks(relaxed).values())
    units = spectral.units_of(kind, _maps(model), 4, 2)
    assert used <= 5000 < spectral.total_cost(kind, units, spectral.uniform_ranks(kind, units, level + 1))
    assert relaxed.config.recursion["lora"]["rank_pattern"]  # resolved ranks are stored for loading


@pytest.mark.parametrize("kind", KINDS)
def test_spectral_allocation_spends_the_budget_on_heavy_residuals(kind):
    model = _model("llama")
    with torch.no_grad():  # make one layer's q_proj far from the shared one
        decoder_layers(model)[3].self_attn.q_proj.weight.mul_(8.0)
    # lower init: positions 0, 1 are the shared layers themselves; 2 and 3 carry the residuals.
    uniform = convert_to_recursive(model, 2, init="lower", relaxation={"kind": kind, "budget": 6000})
    allocated = convert_to_recursive(
        model, 2, init="lower", relaxation={"kind": kind, "budget": 6000, "allocation": "spectral"}
    )
    ranks = relaxation_ranks(allocated)
    heavy = "1/self_attn.q_proj" if kind == "shared_basis" else "3/self_attn.q_proj"
    assert ranks[heavy][0] == max(r[0] for r in ranks.values()) > min(r[0] for r in ranks.values())
    assert relaxation_parameters(allocated) <= 6000
    assert _weight_error(allocated, model) < _weight_error(uniform, model)


def _weight_error(relaxed, model):
    exact, approx = [], []
    for layer, source in zip(decoder_layers(relaxed), decoder_layers(model), strict=True):
        for name, module in relaxed_maps(layer).items():
            exact.append(weight_out_in(source.get_submodule(name)))
            approx.append(weight_out_in(module.base_layer) + module.delta_weight())
    return spectral.relative_error(exact, approx)


def test_greedy_allocation_follows_the_captured_energy():
    units = [spectral.Unit("0/a", 4, 4, 1), spectral.Unit("0/b", 4, 4, 1)]
    gains = {"0/a": torch.tensor([0.0, 10, 19, 27, 30]), "0/b": torch.tensor([0.0, 1, 1.5, 1.7, 1.8])}
    # lora: 8 parameters per rank step; budget 40 = 5 ranks: 1 + 1, then a takes the next three.
    assert spectral.allocate_spectral("lora", units, 40, gains) == {"0/a": (4, 4), "0/b": (1, 1)}
    with pytest.raises(spectral.RelaxationError, match="budget 15 is below"):
        spectral.allocate_spectral("lora", units, 15, gains)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, field, message",
    [
        ({"kind": "svd_depth", "rank": 2}, "kind", "unknown relaxation 'svd_depth'"),
        ({"kind": "lamda_depth"}, "rank", "needs a rank or a budget"),
        ({"kind": "lamda_depth", "rank": 2, "budget": 100}, "budget", "not both"),
        ({"kind": "lora", "rank": 2, "rank_in": 3}, "rank_in", "shared_basis only"),
        ({"kind": "lamda_depth", "rank": 2, "init": "zero"}, "init", "lora only"),
        ({"kind": "shared_basis", "rank": 2, "train": ["lora"]}, "train", "subset"),
        ({"kind": "lora", "rank": 2, "allocation": "spectral"}, "allocation", "needs a budget"),
        ({"kind": "lora", "rank": 0}, "rank", "positive integer"),
    ],
)
def test_bad_relaxation_settings_raise_one_line_errors_naming_the_setting(settings, field, message):
    with pytest.raises(spectral.RelaxationError, match=message) as info:
        RelaxationSpec(**settings)
    assert info.value.field == field and "\n" not in str(info.value)
    assert isinstance(info.value, RecursiveConfigError)


@pytest.mark.parametrize(
    "kind, budget, message",
    [("lamda_depth", 100, "below the smallest"), ("shared_basis", 10**7, "exceeds what full-rank")],
)
def test_budgets_no_rank_can_meet_are_refused(kind, budget, message):
    with pytest.raises(spectral.RelaxationError, match=message):
        convert_to_recursive(_model("llama"), 2, relaxation={"kind": kind, "budget": budget})


def test_a_rank_above_what_the_residuals_allow_is_refused():
    units = spectral.units_of("shared_basis", _maps(_model("llama")), 4, 2)
    spectral.check_uniform_rank("shared_basis", units, 48)  # gate (32 -> 48): r_out up to 48 > 32
    with pytest.raises(spectral.RelaxationError, match="rank 49 exceeds") as info:
        spectral.check_uniform_rank("shared_basis", units, 49)
    assert info.value.field == "rank"
    lora_units = spectral.units_of("lora", _maps(_model("llama")), 4, 2)
    with pytest.raises(spectral.RelaxationError, match="at most 32"):
        spectral.check_uniform_rank("lora", lora_units, 33)


@pytest.mark.parametrize("kind", KINDS)
def test_a_relaxed_models_record_counts_its_relaxation_both_ways(kind):
    from lamda_repro.recursive.relax import linear_map_names
    from lamda_repro.recursive.runner import relaxation_record

    relaxed = convert_to_recursive(_model("llama"), 2, relaxation={"kind": kind, "budget": 4000})
    assert linear_map_names(decoder_layers(relaxed)[0]) == linear_map_names(decoder_layers(_model())[0])
    info = relaxation_record(relaxed)
    assert info["kind"] == kind and info["budget"] == 4000
    assert info["parameters"] == info["parameters_closed_form"] == relaxation_parameters(relaxed) <= 4000
    assert sum(info["rank_histogram"].values()) == len(relaxation_ranks(relaxed))


# -- the weight-error table ----------------------------------------------------------------------


def test_weight_error_rows_match_the_relaxed_models():
    from lamda_repro.recursive.relax_error import relaxation_error_rows

    model = _model("llama", num_layers=4)
    rows = relaxation_error_rows(decoder_layers(model), 2, [2], init="average", allocations=("uniform",))
    by_kind = {r["relaxation"]: r for r in rows}
    lora_units = spectral.units_of("lora", _maps(model), 4, 2)
    budget = spectral.total_cost("lora", lora_units, spectral.uniform_ranks("lora", lora_units, 2))
    for kind in KINDS:
        relaxed = convert_to_recursive(model, 2, init="average", relaxation={"kind": kind, "budget": budget})
        assert by_kind[kind]["parameters"] == relaxation_parameters(relaxed)
        assert abs(by_kind[kind]["relative_error"] - _weight_error(relaxed, model)) < 1e-5
    plain = convert_to_recursive(model, 2, init="average")
    tied = [weight_out_in(m) for layer in decoder_layers(plain) for m in _linear_maps(layer)]
    exact = [weight_out_in(m) for layer in decoder_layers(model) for m in _linear_maps(layer)]
    assert abs(by_kind["none (recursive)"]["relative_error"] - spectral.relative_error(exact, tied)) < 1e-6


def _linear_maps(layer):
    from lamda_repro.recursive.relax import linear_map_names

    return [layer.get_submodule(n) for n in linear_map_names(layer)]


def test_docs_blocks_are_replaced_in_place():
    from lamda_repro.recursive.report import replace_block

    text = "a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n"
    assert replace_block(text, "x", "| new |\n") == "a\n<!-- x:begin -->\n| new |\n<!-- x:end -->\nb\n"
    with pytest.raises(ValueError, match="no block"):
        replace_block(text, "y", "z")


@pytest.mark.slow
def test_the_minilm_weight_error_table_in_the_docs_comes_from_the_command(repo_root, minilm_path):
    from transformers import AutoModel

    from lamda_repro.recursive.relax_error import error_table_markdown, find_layers, relaxation_error_rows

    layers = find_layers(AutoModel.from_pretrained(minilm_path, use_safetensors=True))
    rows = relaxation_error_rows(layers, 2, [12], kinds=("shared_basis",), allocations=("uniform",))
    lines = error_table_markdown(rows, "all-MiniLM-L6-v2").splitlines()[2:]
    docs = (repo_root / "docs" / "recursive.md").read_text()
    block = docs.split("<!-- relax-error-minilm:begin -->")[1].split("<!-- relax-error-minilm:end -->")[0]
    assert len(lines) == 2 and all(line in block.splitlines() for line in lines)


# -- the config section: bad relaxations stop the workflow before any job ------------------------

SECTION = {
    "models": {"tiny": {"pretrain": {"num_layers": 4, "hidden_size": 32, "intermediate_size": 48}}},
    "runs": [{"name": "full", "model": "tiny", "variant": "original"}],
}


@pytest.mark.parametrize(
    "run, key, message",
    [
        ({"relaxation": {"kind": "svd_depth", "rank": 2}}, "relaxation.kind", "must be one of"),
        ({"relaxation": {"kind": "lamda_depth", "rank": 33}}, "x.relaxation.rank", "rank 33 exceeds"),
        ({"relaxation": {"kind": "shared_basis", "rank": 4, "rank_in": 65}}, "x.relaxation.rank_in", "65"),
        ({"lora_rank": 40}, "x.lora_rank", "at most 32"),
        ({"relaxation": {"kind": "shared_basis", "budget": 10}}, "x.relaxation.budget", "below"),
        ({"relaxation": {"kind": "lora", "budget": 10**8}}, "x.relaxation.budget", "exceeds"),
        (
            {"relaxation": {"kind": "lamda_depth", "rank": 2, "init": "zero"}},
            "x.relaxation.init",
            "lora only",
        ),
        ({"lora_rank": 2, "relaxation": {"rank": 2}}, "runs.x", "not both"),
        ({"num_loops": 3, "lora_rank": 2}, "x.num_loops", "does not divide"),
    ],
)
def test_bad_relaxations_in_the_config_fail_with_one_line_naming_the_key(run, key, message):
    import copy

    from lamda_repro.recursive.runner import resolve_section

    section = copy.deepcopy(SECTION)
    section["runs"].append({"name": "x", "model": "tiny", "variant": "recursive", "num_loops": 2, **run})
    with pytest.raises(ValueError, match=message) as info:
        resolve_section(section)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_budgets_in_lora_ranks_resolve_to_what_lora_adds_at_that_rank():
    from lamda_repro.recursive.runner import budget_lora_ranks, relaxation_spec, resolve_section

    shared = {"kind": "shared_basis", "budget": {"lora_rank": 4}}
    runs = [
        {"name": "l4", "model": "tiny", "variant": "recursive", "num_loops": 2, "lora_rank": 4},
        {"name": "s4", "model": "tiny", "variant": "recursive", "num_loops": 2, "relaxation": shared},
    ]
    section = resolve_section({**SECTION, "runs": runs})
    assert budget_lora_ranks(section, "tiny") == [4]
    maps = _maps(_model("llama"))  # the same geometry as the section's tiny model
    spec = relaxation_spec(section["runs"][1], maps, 4, seed=3)
    lora_cost = non_embedding_counts(tiny_config("llama", num_layers=4, **SHAPE), 2, lora_rank=4)[
        "relaxation"
    ]
    assert spec.kind == "shared_basis" and spec.budget == lora_cost == 4 * 4 * sum(
        i + o for i, o in maps.values()
    )
    assert spec.seed == 3 and spec.rank is None


# -- table, figure and ledger --------------------------------------------------------------------


def test_pareto_front_keeps_exactly_the_undominated_points():
    from lamda_repro.tables import pareto_front

    xs, ys = [1, 2, 2, 3, 4], [0.5, 0.7, 0.6, 0.7, 0.9]
    assert pareto_front(xs, ys) == [True, True, False, False, True]
    assert pareto_front(xs, [3.9, 3.7, 3.8, 3.6, 3.6], maximize=False) == [True, True, False, True, False]
    assert pareto_front([1, 1], [0.5, 0.5]) == [True, True]  # ties dominate neither


def _relaxed_record(name, kind, params, acc, ppl, budget=None, rank=None):
    run = {"name": name, "model": "tiny", "variant": "recursive", "num_loops": 2, "init": "average"}
    if kind == "lora" and rank:
        run["lora_rank"] = rank
    elif kind is not None:
        run["relaxation"] = {"kind": kind, "budget": {"lora_rank": budget}}
    info = {"kind": kind, "budget": 100, "allocation": "uniform", "rank_histogram": {"7": 21}} if kind else {}
    return {
        "kind": "recursive",
        "run_id": f"tiny--{name}",
        "status": "success",
        "spec": {"run": run, "model": {"label": "tiny", "pretrain": {}}},
        "params": {"non_embedding": params, "non_embedding_base": 2000},
        "method_info": {"relaxation": info} if kind else {},
        "metrics": {"acc_t": acc, "average": acc, "perplexity": ppl},
        "tokens_seen": 4096,  # every run uptrained on the same tokens: the on-par claim compares them
    }


RECORDS = [
    {
        **_relaxed_record("full", None, 2000, 0.80, 3.5),
        "spec": {
            "run": {"name": "full", "model": "tiny", "variant": "original"},
            "model": {"label": "tiny", "pretrain": {}},
        },
    },
    _relaxed_record("rrt-r4", "lora", 1300, 0.70, 3.70, rank=4),
    _relaxed_record("shared-b4", "shared_basis", 1290, 0.72, 3.65, budget=4),
    _relaxed_record("lamda-b4", "lamda_depth", 1250, 0.60, 3.90, budget=4),
]


def test_the_table_describes_relaxations_and_marks_the_fronts(tmp_path):
    from lamda_repro.recursive.report import plot_accuracy_vs_params, write_table

    frame = write_table(RECORDS, tmp_path / "t")
    fronts = dict(zip(frame["run"], frame["front"], strict=True))
    assert fronts == {"lamda-b4": "acc, ppl", "shared-b4": "acc, ppl", "rrt-r4": "", "full": "acc, ppl"}
    md = (tmp_path / "t.md").read_text()
    assert "relaxed shared_basis (r=7, budget = lora r=4) B=2 cycle average" in md and "| Front |" in md
    assert plot_accuracy_vs_params(RECORDS, tmp_path / "f.png").stat().st_size > 1000


def test_spectral_runs_stay_out_of_the_paper_claims_and_enter_the_findings():
    from lamda_repro import claims

    evidence = claims.Evidence.from_records(RECORDS)
    kinds = {r["run_id"]: r["kind"] for r in claims.recursive_rows(evidence.recursive)}
    assert kinds == {
        "tiny--full": "original",
        "tiny--rrt-r4": "relaxed",
        "tiny--shared-b4": "spectral",
        "tiny--lamda-b4": "spectral",
    }
    on_par = claims.check_relaxed_on_par({"tolerance": 0.03}, evidence)
    # the best relaxed run is the lora one, not shared-b4 (72%)
    assert "relaxed r=4 tiny--rrt-r4 70.00%" in on_par.measured and "shared-b4" not in on_par.measured
    (finding,) = claims.suite_findings(evidence)
    assert "tiny shared_basis: 1/1 runs on the accuracy front" in finding["this suite"]
    assert "tiny lora: 0/1 runs on the accuracy front" in finding["this suite"]
    assert "Findings of this suite (not claims of either paper)" in claims.claims_markdown(
        [], findings=[finding]
    )
    rows = [
        {
            "id": "c",
            "paper": "p",
            "claim": "x",
            "source": "s",
            "paper value": "v",
            "this suite": "m",
            "scale": "smoke",
            "verdict": "ok",
        }
    ]
    text = claims.claims_markdown(rows, findings=[finding])
    assert text.index("Findings of this suite") > text.index("| c |")


def test_cli_counts_each_relaxation(tmp_path, capsys):
    import json

    from lamda_repro.recursive.cli import main

    tiny_config("llama", num_layers=4, **SHAPE).save_pretrained(tmp_path)
    totals = {}
    for kind in KINDS:
        argv = ["recursive-counts", "--model-config", str(tmp_path), "--lora-rank", "4", "--relaxation", kind]
        assert main(argv) == 0
        totals[kind] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["relaxation"]
    maps = _maps(_model("llama"))
    per_layer = sum(i + o for i, o in maps.values())
    assert totals == {
        "lora": 4 * 4 * per_layer,
        "lamda_depth": 4 * (4 * per_layer + 7 * 16),
        "shared_basis": 2 * (4 * per_layer + 7 * 2 * 16),
    }


def test_a_local_model_folder_is_checked_before_any_job_and_a_hub_id_when_it_builds(tmp_path):
    from lamda_repro.recursive.runner import RecursiveRunError, resolve_section

    tiny_config("llama", num_layers=4, **SHAPE).save_pretrained(tmp_path)
    run = {"name": "x", "model": "m", "variant": "recursive", "num_loops": 2, "lora_rank": 33}
    with pytest.raises(RecursiveRunError, match="recursive.runs.x.lora_rank: rank 33 exceeds"):
        resolve_section({"models": {"m": {"path": str(tmp_path)}}, "runs": [run]})
    # Without the config at hand (a Hub id offline) only the settings are checked here.
    assert resolve_section({"models": {"m": {"path": "org/not-here"}}, "runs": [run]})["runs"]
