"""The paper config against replicas of the Hub repositories it names (group `hub`).

The replicas (tests/hub/manifests/ + tests/hub/replicas.py) have the published file names, formats
and layout; a local Hub-compatible server (tests/hub/server.py) serves them on 127.0.0.1, so the
suite's own loading code and ``lamda-repro preflight`` run as they would against the Hub. Each
check runs in a fresh process (the Hub libraries read HF_ENDPOINT / HF_TOKEN at import); the
loading run and the intact preflight run share the two cores.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub.replicas import build_replicas, manifests, published_files
from hub.server import GRANTED_TOKEN, HubReplicaServer

pytestmark = pytest.mark.hub

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "paper.yaml"
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE")
# Runs the command line with the packages named in argv[1] hidden from every import finder, so that
# imports and importlib.util.find_spec see them as not installed (a machine without them).
BLOCKER = """
import sys
class _Without:
    def __init__(self, finder, names): self.finder, self.names = finder, names
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):  # find_distributions, invalidate_caches, ...: the wrapped finder's
        return getattr(self.finder, attr)
hidden = set(sys.argv[1].split(","))
sys.meta_path[:] = [_Without(f, hidden) for f in sys.meta_path]
from lamda_repro.cli import main
sys.exit(main(sys.argv[2:]))
"""


def paper_items() -> list[str]:
    """Every item the loading run must report for config/paper.yaml."""
    config = yaml.safe_load(PAPER.read_text())
    items = []
    for exp in config["experiments"].values():
        for model in exp["models"]:
            items += [f"finetune:{model}:{task}" for task in exp["tasks"]]
            items += [f"method:{model}:{m}" for m in exp["methods"] if config["methods"][m]["type"] == "lora"]
    section = config["recursive"]
    items += [f"recursive:{name}" for name in section["models"]]
    items += [f"corpus:{section['corpus']['name']}:{s}" for s in ("train", "validation")]
    items.append("lm_eval:tasks")
    return list(dict.fromkeys(items))


def hub_env(endpoint: str, home: Path, token: str | None = GRANTED_TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE and k != "HF_TOKEN"}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1" if token is None else "0",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def preflight(endpoint, home, config_path, token=GRANTED_TOKEN, blocked=(), wait=True, extra=()):
    args = [
        sys.executable,
        "-c",
        BLOCKER,
        ",".join(blocked) or "-",
        "preflight",
        str(config_path),
        "--no-cuda-check",
        *extra,
    ]
    proc = subprocess.Popen(
        args, env=hub_env(endpoint, home, token), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc if not wait else _finish(proc)


def _finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def table_rows(out: str) -> dict[str, str]:
    """item -> its whole table row, for the rows that start with OK or FAIL."""
    rows = {}
    for line in out.splitlines():
        if line.startswith(("OK  ", "FAIL  ")):
            parts = line.split()
            rows[" ".join(parts[2:5])] = line
    return rows


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = build_replicas(tmp_path_factory.mktemp("replicas"))
    server = HubReplicaServer(root).start()
    yield server, root, tmp_path_factory
    server.stop()


@pytest.fixture(scope="module")
def runs(hub):
    """The loading run and the intact preflight run, side by side."""
    server, _, factory = hub
    report = factory.mktemp("load") / "report.json"
    load = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "hub" / "load_all.py"),
            str(PAPER),
            str(report),
            str(report.parent),
        ],
        env=hub_env(server.endpoint, factory.mktemp("home-load")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pre_home = factory.mktemp("home-pre")
    pre = preflight(server.endpoint, pre_home, PAPER, wait=False, extra=["--download"])
    load_rc, load_out = _finish(load)
    pre_rc, pre_out = _finish(pre)
    assert load_rc == 0, load_out[-3000:]
    return json.loads(report.read_text()), (pre_rc, pre_out, pre_home)


def test_replicas_publish_exactly_the_listed_files(hub):
    _, root, _ = hub
    for m in manifests():
        assert m.get("read") and m.get("sources"), f"{m['id']}: the manifest says where and when it was read"
        kind = "models" if m["kind"] == "model" else "datasets"
        for revdir, rev in m["revisions"].items():
            assert published_files(root / kind / m["id"] / revdir) == set(rev["files"]), (m["id"], revdir)


@pytest.mark.parametrize("item", paper_items())
def test_suite_loads_paper_item_from_its_replica(runs, item):
    report, _ = runs
    assert item in report, f"{item} was not checked"
    assert report[item]["ok"], f"{item}: {report[item]['detail']}"


def test_deberta_adapters_are_exactly_attention_and_feed_forward(runs):
    """Per layer: query/key/value projections, attention output, intermediate and output dense layers;
    never pooler.dense (absent from the checkpoint, freshly initialised)."""
    report, _ = runs
    config = yaml.safe_load(PAPER.read_text())
    adapted = json.loads(report["method:deberta_v3_base:lora"]["detail"])
    layers = config_layers = 2  # the replica's num_hidden_layers (tests/hub/manifests)
    expected = {
        f"base_model.model.deberta.encoder.layer.{i}.{suffix}"
        for i in range(config_layers)
        for suffix in (
            "attention.self.query_proj",
            "attention.self.key_proj",
            "attention.self.value_proj",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    }
    assert set(adapted) == expected and len(adapted) == 6 * layers
    assert not any("pooler" in name for name in adapted)
    deberta_methods = config["experiments"]["glue"]["methods"]
    lists = {tuple(config["methods"][m].get("target_modules", ())) for m in deberta_methods}
    assert all("dense" not in targets for targets in lists), "a bare `dense` would also adapt pooler.dense"


def test_preflight_on_intact_replicas_prints_every_item_ok(runs):
    _, (rc, out, _) = runs
    rows = table_rows(out)
    assert rc == 0, out[-3000:]
    assert rows and all(line.startswith("OK") for line in rows.values()), out[-3000:]
    for repo in (
        "meta-llama/Llama-2-7b-hf",
        "google/gemma-2b",
        "cerebras/SlimPajama-627B",
        "allenai/ai2_arc/ARC-Challenge",
    ):
        assert any(repo in line for line in rows.values()), f"{repo} not in the table"


def test_preflight_download_fills_the_shared_cache(runs):
    """--download: the models' safetensors (at the pinned revisions) and the data sets are in HF_HOME."""
    _, (rc, out, home) = runs
    assert rc == 0 and "cache filled under" in out, out[-2000:]
    deberta = list(
        (home / "hub" / "models--microsoft--deberta-v3-base" / "snapshots").glob("*/model.safetensors")
    )
    assert deberta and not list(deberta[0].parent.glob("*.bin"))
    assert list(
        (home / "hub" / "models--google--gemma-2b" / "snapshots").glob("*/model-00002-of-00002.safetensors")
    )
    cached = {p.name for p in (home / "datasets").iterdir()} if (home / "datasets").exists() else set()
    assert any("glue" in name for name in cached) and any("ai2_arc" in name for name in cached), cached


def _broken_config(tmp: Path, name: str, edit) -> Path:
    config = copy.deepcopy(yaml.safe_load(PAPER.read_text()))
    edit(config)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_preflight_names_gated_bin_only_and_script_only_repositories(hub):
    """No token: the gated Llama-2 is named with its licence page; DeBERTa at main (pytorch_model.bin
    only) and XSum at main (a loading script only) are named with their fixes."""
    server, _, factory = hub

    def edit(c):
        c["models"]["deberta_v3_base"].pop("revision")
        c["tasks"]["xsum"].pop("hub_revision")
        c["experiments"] = {k: c["experiments"][k] for k in ("glue", "xsum", "wikitext2")}
        c["experiments"]["glue"]["tasks"] = ["rte"]
        del c["recursive"]

    path = _broken_config(factory.mktemp("broken1"), "broken1", edit)
    rc, out = preflight(server.endpoint, factory.mktemp("home-b1"), path, token=None)
    assert rc == 1, out[-3000:]
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    llama = next(line for line in fails if "meta-llama/Llama-2-7b-hf" in line)
    assert (
        "gated" in llama
        and "https://huggingface.co/meta-llama/Llama-2-7b-hf" in llama
        and "hf auth login" in llama
    )
    deberta = next(line for line in fails if "microsoft/deberta-v3-base" in line)
    assert "pytorch_model.bin" in deberta and "revision" in deberta
    xsum = next(line for line in fails if "EdinburghNLP/xsum" in line)
    assert "xsum.py" in xsum and "hub_revision: refs/convert/parquet" in xsum
    assert len(fails) == 3, out[-3000:]


def test_preflight_names_missing_converter_and_codec(hub):
    """Without sentencepiece, DeBERTa's spm.model cannot become a tokenizer; without zstandard,
    SlimPajama's .jsonl.zst cannot be read: both named with the pinned install."""
    server, _, factory = hub

    def edit(c):
        c["experiments"] = {"glue": c["experiments"]["glue"]}
        c["experiments"]["glue"]["tasks"] = ["rte"]
        c["recursive"]["models"] = {"pythia-1b": c["recursive"]["models"]["pythia-1b"]}
        c["recursive"]["eval"]["tasks"] = ["arc_easy"]
        c["recursive"]["runs"] = [r for r in c["recursive"]["runs"] if r["model"] == "pythia-1b"][:1]
        c["recursive"].pop("serving", None)
        c["recursive"].pop("early_exit", None)

    path = _broken_config(factory.mktemp("broken2"), "broken2", edit)
    rc, out = preflight(
        server.endpoint, factory.mktemp("home-b2"), path, blocked=("sentencepiece", "zstandard")
    )
    assert rc == 1, out[-3000:]
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    deberta = next(line for line in fails if "microsoft/deberta-v3-base" in line)
    assert "spm.model" in deberta and "sentencepiece" in deberta and "pip install sentencepiece==" in deberta
    corpus = next(line for line in fails if "cerebras/SlimPajama-627B" in line)
    assert ".zst" in corpus and "pip install zstandard==" in corpus
    assert len(fails) == 2, out[-3000:]
