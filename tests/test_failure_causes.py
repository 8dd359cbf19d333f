"""Failures classified by cause (a data set missing offline is deterministic: a failed record, no
retries), counts that can only be mistakes refused before any work, and `lamda-repro validate`
refusing what the workflow refuses."""

from __future__ import annotations

import copy
import json

import pytest
from test_train import LORA, tiny_spec

from lamda_repro.config import ConfigError, load_config, validate_config
from lamda_repro.resume import is_transient


def test_a_data_set_missing_offline_is_a_failed_record_not_a_retry(tmp_path, monkeypatch, capsys):
    import lamda_repro.recursive  # noqa: F401  (registers its section's check, as the cli does)
    from lamda_repro.cli import main

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    spec = tiny_spec(LORA)
    task = {"type": "glue", "subset": "sst2", "revision": "main"}
    spec = type(spec)(**{**spec.to_dict(), "task_params": task})  # the Hub's SST-2: not cached here
    out = tmp_path / "rec.json"
    args = ["run", "--spec", json.dumps(spec.to_dict()), "--out", str(out), "--workdir", str(tmp_path)]
    assert main([*args, "--device", "cpu"]) == 0
    rec = json.loads(out.read_text())
    assert rec["status"] == "failed" and "OfflineModeIsEnabled" in rec["error"]


def test_offline_refusals_are_deterministic_and_lost_connections_transient():
    try:
        try:
            raise OSError("OfflineModeIsEnabled: cannot reach the Hub")
        except OSError as cause:
            raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub") from cause
    except ConnectionError as exc:
        chained = exc
    assert not is_transient(chained)
    assert not is_transient(ConnectionError("Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)"))
    assert is_transient(ConnectionResetError("connection reset by peer"))


@pytest.fixture(scope="module")
def smoke_config():
    import lamda_repro.recursive  # noqa: F401

    return load_config("config/config.yaml")


@pytest.mark.parametrize(
    "where, value, message",
    [
        (("training", "epochs"), 1e9, "training.epochs: must be <= 10000"),
        (("training", "max_steps"), 10**12, "training.max_steps: must be <= 100000000"),
        (("experiments", "nlu", "seeds"), [2**40], "experiments.nlu.seeds[0]: must be <= 4294967295"),
        (("data", "sentiment", "seed"), 2**32, "data.sentiment.seed: must be <= 4294967295"),
        (("models", "tiny_gpt2", "pretrain", "steps"), 10**9, "models.tiny_gpt2.pretrain.steps: must be <= "),
        (("recursive", "corpus", "data"), "nope", "recursive.corpus.data: unknown data set 'nope'"),
        (("recursive", "models", "tiny", "model"), "minilm", "recursive.models.tiny.model: 'minilm' is not"),
    ],
)
def test_validate_refuses_what_the_workflow_refuses(smoke_config, where, value, message):
    config = copy.deepcopy(smoke_config)
    block = config
    for key in where[:-1]:
        block = block.setdefault(key, {})
    block[where[-1]] = value
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert str(err.value).startswith(message)
