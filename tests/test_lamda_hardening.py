"""LaMDA outside the smoke path: loading without SVD, optimizers while B freezes, registration, loaders."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_lamda_helpers import LLAMA_TARGETS, tiny_llama, token_batch

from lamda_repro.methods.lamda import LamdaConfig, LamdaFreezeController, LamdaLayer


def lamda_llama(init="svd", r=4, **kw):
    return get_peft_model(
        tiny_llama(), LamdaConfig(r=r, lora_alpha=8, target_modules=LLAMA_TARGETS, init=init, **kw)
    )


def layers(model):
    return [m for m in model.modules() if isinstance(m, LamdaLayer)]


@pytest.fixture
def svd_calls(monkeypatch):
    """Counts every call of the decompositions the LaMDA init could use."""
    calls = []

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.linalg, "svd", counting("linalg.svd", torch.linalg.svd))
    monkeypatch.setattr(torch, "svd_lowrank", counting("svd_lowrank", torch.svd_lowrank))
    monkeypatch.setattr(torch, "svd", counting("svd", torch.svd))
    return calls


def _train(model, steps, optimizer, controller):
    x = token_batch()
    model.train()
    for step in range(steps):
        model(x, labels=x).loss.backward()
        controller.before_optimizer_step(optimizer, step)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _trained_and_saved(tmp_path, init):
    model = lamda_llama(init, total_steps=10, freeze_fraction=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, 3, optimizer, LamdaFreezeController(model, 10))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("init", ["svd", "svd_lowrank", "reference_code"])
def test_loading_a_saved_adapter_runs_no_svd(tmp_path, svd_calls, init):
    model = _trained_and_saved(tmp_path, init)
    built_with = len(svd_calls)
    # The counter sees the init's decompositions (svd_lowrank calls linalg.svd inside).
    assert built_with == {"svd": 14, "svd_lowrank": 28, "reference_code": 0}[init]
    x = token_batch(seed=5)
    with torch.no_grad():
        expected = model(x).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert svd_calls[built_with:] == []
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, atol=0, rtol=0)
    # The mark is spent by the load: the same config initialises a new adapter again.
    assert not loaded.peft_config["default"].loading_saved_weights
    again = get_peft_model(tiny_llama(), loaded.peft_config["default"])
    assert len(svd_calls) == 2 * built_with
    assert any(torch.count_nonzero(m.lamda_A["default"]) for m in layers(again))


def test_svd_residual_still_decomposes_on_load(tmp_path, svd_calls):
    model = _trained_and_saved(tmp_path, "svd_residual")
    built_with = len(svd_calls)
    x = token_batch(seed=5)
    with torch.no_grad():
        expected = model(x).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert len(svd_calls) - built_with == 14  # the residual W - U_r Sigma_r V_r^T is not saved
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_loading_an_incomplete_adapter_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _trained_and_saved(tmp_path, "svd")
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    dropped = next(k for k in weights if "lamda_A" in k)
    del weights[dropped]
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="has no lamda_A"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def _adafactors():
    from transformers.optimization import Adafactor

    return {
        "torch": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1),
        "transformers": lambda ps: Adafactor(
            ps, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False, beta1=0.9
        ),
    }


class SignDescent(torch.optim.Optimizer):
    """A Lion-like optimizer this suite knows nothing about: sign of the momentum, decoupled decay."""

    def __init__(self, params, lr=1e-2, weight_decay=0.5):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(0.9).add_(p.grad)
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(buf.sign(), alpha=-group["lr"])


def _frozen_columns_never_move(model, optimizer, controller_optimizer, steps=12):
    """Train with ``optimizer`` while B freezes; check frozen columns stay and the others train."""
    controller = LamdaFreezeController(model, steps)
    x = token_batch()
    layer = layers(model)[0]
    model.train()
    frozen_seen = {}
    for step in range(steps):
        model(x, labels=x).loss.backward()
        controller.before_optimizer_step(controller_optimizer, step)
        k = layer.frozen_components("default")
        frozen_seen[k] = layer.full_B("default").detach().clone()
        before = frozen_seen[k]
        optimizer.step()
        optimizer.zero_grad()
        if step > 0 and k < 4:  # (S = 0 at step 0: B's gradient is 0)
            assert not torch.equal(before[:, k:], layer.full_B("default").detach()[:, k:])  # still trains
    assert layer.frozen_components("default") == 4
    final = layer.full_B("default").detach()
    for k, snapshot in frozen_seen.items():
        assert torch.equal(final[:, :k], snapshot[:, :k])  # frozen columns never move again


@pytest.mark.parametrize("kind", ["torch", "transformers"])
def test_adafactor_trains_while_b_freezes_column_by_column(kind):
    model = lamda_llama(total_steps=12, freeze_fraction=0.5)
    optimizer = _adafactors()[kind]([p for p in model.parameters() if p.requires_grad])
    _frozen_columns_never_move(model, optimizer, optimizer)


def test_any_optimizer_keeps_frozen_columns_even_with_momentum_and_decay():
    model = lamda_llama(total_steps=12, freeze_fraction=0.5)
    optimizer = SignDescent([p for p in model.parameters() if p.requires_grad])
    _frozen_columns_never_move(model, optimizer, optimizer)


def test_freezing_without_the_optimizer_still_keeps_frozen_columns():
    model = lamda_llama(total_steps=12, freeze_fraction=0.5)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5
    )
    _frozen_columns_never_move(model, optimizer, None)


UNREGISTERED_LOAD = """
import sys
sys.path.insert(0, {tests!r})
import torch
from peft import PeftModel
from test_lamda_helpers import tiny_llama, token_batch
from lamda_repro.methods.adapters import AdapterTypeError, check_adapter_loadable, load_adapter

assert "lamda_repro.methods.lamda" not in sys.modules
try:
    PeftModel.from_pretrained(tiny_llama(), {path!r})
except KeyError as exc:
    print("peft alone:", repr(exc))
try:
    check_adapter_loadable({path!r})
except AdapterTypeError as exc:
    print("check:", exc)
loaded = load_adapter(tiny_llama(), {path!r})
with torch.no_grad():
    torch.save(loaded(token_batch(seed=5)).logits, {out!r})
"""


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft: ~20 s
def test_loading_before_the_lamda_import_names_the_import_or_registers_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model = _trained_and_saved(tmp_path / "adapter", "svd")
    with torch.no_grad():
        expected = model(token_batch(seed=5)).logits
    script = UNREGISTERED_LOAD.format(
        tests=str(Path(__file__).parent), path=str(tmp_path / "adapter"), out=str(tmp_path / "out.pt")
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert "LAMDA" in lines["peft alone"]  # peft alone: a bare KeyError
    assert lines["check"] == (
        f"{tmp_path / 'adapter'} holds a LAMDA adapter, which peft knows only after "
        "`import lamda_repro.methods.lamda` (or load it with lamda_repro.methods.adapters.load_adapter)"
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected, atol=0, rtol=0)


def test_a_folder_without_adapter_config_is_refused(tmp_path):
    from lamda_repro.methods.adapters import AdapterTypeError, load_adapter

    with pytest.raises(AdapterTypeError, match="no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path)
