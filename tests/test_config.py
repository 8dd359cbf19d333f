"""Config validation: every malformed config fails with one line naming the key and the problem."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

import lamda_repro.recursive  # noqa: F401  (registers the check of the recursive section)
from lamda_repro.config import ConfigError, RunSpec, expand_runs, load_config, record_path, validate_config


def default_config(repo_root) -> dict:
    return load_config(repo_root / "config" / "config.yaml")


def _set(cfg, dotted, value):
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value


_DELETE = object()

# (key to change, new value, expected key path in the message, expected problem text)
MALFORMED = [
    ("methods.lora_r8.type", "lorra", "methods.lora_r8.type", "unknown method type 'lorra'"),
    ("methods.lora_r8.r", -3, "methods.lora_r8.r", "must be >= 1"),
    ("methods.lora_r8.dropout", 1.5, "methods.lora_r8.dropout", "must be < 1"),
    ("methods.lora_r8.rnk", 8, "methods.lora_r8", "unknown key 'rnk'"),
    ("experiments.nlu.tasks", ["smoke_sst2", "nope"], "experiments.nlu.tasks[1]", "unknown task 'nope'"),
    ("experiments.nlu.methods", ["full_ft", "qlora"], "experiments.nlu.methods[1]", "unknown method 'qlora'"),
    ("experiments.nlu.models", [], "experiments.nlu.models", "must not be empty"),
    ("experiments.nlu.seeds", [0, 0], "experiments.nlu.seeds", "duplicate"),
    ("experiments.nlu.methods", _DELETE, "experiments.nlu", "missing required key 'methods'"),
    ("training.epochs", "three", "training.epochs", "expected number"),
    ("training.lr", -1.0, "training.lr", "must be > 0"),
    ("training.batchsize", 8, "training", "unknown key 'batchsize'"),
    ("unknown_section", {"a": 1}, "config", "unknown key 'unknown_section'"),
    ("device", "tpu", "device", "must be one of"),
    ("models.minilm.source", "ftp", "models.minilm.source", "must be one of"),
    ("models.minilm.package", _DELETE, "models.minilm", "needs key 'package'"),
    ("tasks.smoke_sst2.subset", "sst3", "tasks.smoke_sst2.subset", "must be one of"),
    ("tasks.smoke_sst2.data", "nodata", "tasks.smoke_sst2.data", "unknown data set 'nodata'"),
    ("tasks.smoke_sst2.type", "glu", "tasks.smoke_sst2.type", "unknown task type 'glu'"),
    ("data.sentiment.generator", "nosuch", "data.sentiment.generator", "unknown generator 'nosuch'"),
    ("data.sentiment.n_train", 0, "data.sentiment.n_train", "must be >= 1"),
    ("methods.full_ft.training.lr", "fast", "methods.full_ft.training.lr", "expected number"),
    ("experiments.nlu.models", ["../x"], "experiments.nlu.models[0]", "name '../x' is not allowed"),
]


@pytest.mark.parametrize(
    "key,value,where,problem", MALFORMED, ids=[m[0] + "=" + repr(m[1])[:12] for m in MALFORMED]
)
def test_malformed_config_fails_with_one_line_naming_key(repo_root, key, value, where, problem):
    cfg = default_config(repo_root)
    _set(cfg, key, value)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(where + ":"), msg
    assert problem in msg, msg


def test_default_config_is_valid_and_expands_to_runs(repo_root):
    cfg = validate_config(default_config(repo_root))
    runs = expand_runs(cfg)
    assert runs, "the smoke config must define runs"
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids))
    nlu = [r for r in runs if r.family == "nlu"]
    assert {r.method_type for r in nlu} >= {"full", "lora"}
    assert {r.task for r in nlu} >= {"smoke_sst2", "smoke_stsb"}


def test_training_settings_override_in_order(repo_root):
    cfg = default_config(repo_root)
    cfg["training"]["lr"] = 1.0
    cfg["experiments"]["nlu"]["training"] = {"lr": 2.0, "epochs": 7}
    cfg["methods"]["full_ft"]["training"] = {"lr": 3.0}
    cfg["methods"]["lora_r8"].pop("training", None)
    runs = {(r.method, r.task): r for r in expand_runs(validate_config(cfg)) if r.experiment == "nlu"}
    assert runs[("full_ft", "smoke_sst2")].training["lr"] == 3.0
    assert runs[("lora_r8", "smoke_sst2")].training["lr"] == 2.0
    assert runs[("lora_r8", "smoke_sst2")].training["epochs"] == 7
    assert runs[("full_ft", "smoke_sst2")].training["epochs"] == 7


def test_run_spec_round_trips_and_derives_its_path():
    spec = RunSpec(
        experiment="e",
        family="nlu",
        task="t",
        task_params={"type": "glue", "subset": "sst2"},
        model="m",
        model_params={"source": "hub", "id": "x"},
        method="lora",
        method_type="lora",
        method_params={"type": "lora", "r": 8},
        seed=3,
        training={"lr": 1e-4},
    )
    again = RunSpec.from_dict(copy.deepcopy(spec.to_dict()))
    assert again == spec and again.digest() == spec.digest()
    assert record_path("results", spec.run_id) == "results/runs/e/t/m/lora/seed3.json"


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_recursive_section_is_checked_with_the_rest(repo_root):
    cfg = default_config(repo_root)
    cfg["recursive"]["runs"][0]["model"] = "nope"
    with pytest.raises(ConfigError, match=r"^recursive\.runs\.full\.model: unknown model 'nope'"):
        validate_config(cfg)


# Names become parts of file paths and job commands: anything outside the safe alphabet is
# refused, in every section that names things, with one line naming the section.
HOSTILE_NAMES = ["x;touch PWNED", "$(touch PWNED)", "it's", 'q"uote', "a b", "a/b", "..", ".", "-rf"]
HOSTILE_NAMES += ["a\nb", "ok\n", "n" * 65]
NAME_SITES = {  # where a name is defined -> the key path the error names
    "methods": "methods",
    "experiments": "experiments",
    "tasks": "tasks",
    "models": "models",
    "data": "data",
    "recursive.models": "recursive.models",
    "recursive.budgets": "recursive.budgets",
}


def _rename_key(node: dict, old: str | None, new: str) -> None:
    old = old or next(iter(node))
    node[new] = node.pop(old)


# Every hostile name once (at rotating sites) and every site once more with a command substitution.
_CASES = [(n, sorted(NAME_SITES)[i % len(NAME_SITES)]) for i, n in enumerate(HOSTILE_NAMES)]
_CASES += [("$(touch PWNED)", site) for site in sorted(NAME_SITES) if ("$(touch PWNED)", site) not in _CASES]


@pytest.mark.parametrize("name,site", _CASES, ids=[f"{s}={n!r}" for n, s in _CASES])
def test_unsafe_names_are_refused_with_one_line(repo_root, site, name):
    cfg = default_config(repo_root)
    node = cfg
    for part in site.split("."):
        node = node.setdefault(part, {})
    if not node:
        node["x"] = {"steps": 1}
    _rename_key(node, None, name)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(NAME_SITES[site] + ": name "), msg
    assert "is not allowed" in msg


def test_unsafe_serving_run_ids_are_refused(repo_root):
    cfg = default_config(repo_root)
    cfg["recursive"]["serving"]["vanilla"] = "$(touch PWNED)"
    expected = r"^recursive\.serving\.vanilla: name '\$\(touch PWNED\)' is not allowed"
    with pytest.raises(ConfigError, match=expected):
        validate_config(cfg)


@pytest.mark.parametrize("key", ["name", "teacher", "budget", "model"])
def test_unsafe_recursive_run_fields_are_refused(repo_root, key):
    cfg = default_config(repo_root)
    cfg["recursive"]["runs"][0][key] = "../../x"
    expected = rf"^recursive\.runs\[0\]\.{key}: name '\.\./\.\./x' is not allowed"
    with pytest.raises(ConfigError, match=expected):
        validate_config(cfg)


@pytest.mark.parametrize("name", ["a", "gpt2-medium", "v1.2", "A" * 64, "x..y"])
def test_ordinary_names_pass(repo_root, name):
    cfg = default_config(repo_root)
    cfg["methods"][name] = cfg["methods"].pop("full_ft")
    for exp in cfg["experiments"].values():
        exp["methods"] = [name if m == "full_ft" else m for m in exp["methods"]]
    validate_config(cfg)


def test_schemas_hold_the_library_name_pattern():
    from lamda_repro.schema import NAME_PATTERN, SCHEMA_DIR

    for f in ("config.schema.yaml", "recursive.schema.yaml"):
        assert yaml.safe_load((SCHEMA_DIR / f).read_text())["$defs"]["name"]["pattern"] == NAME_PATTERN


# -- silent misreadings --------------------------------------------------------------------


def test_duplicate_yaml_keys_are_refused_naming_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntraining:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 5.0e-3\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value) == f"{p}: line 5: duplicate key 'lr' (first given on line 3)"
    p.write_text("name: x\nname: y\n")
    with pytest.raises(ConfigError, match="line 2: duplicate key 'name'"):
        load_config(p)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base: &b {lr: 1.0, epochs: 2}\ntraining:\n  <<: *b\n  lr: 3.0\n")
    assert load_config(p)["training"] == {"lr": 3.0, "epochs": 2}


def test_duplicate_keys_in_the_reference_file_are_refused(tmp_path, repo_root):
    from lamda_repro.claims import ReferenceFileError, load_reference

    p = tmp_path / "papers.yaml"
    p.write_text((repo_root / "results" / "reference" / "papers.yaml").read_text() + "\nschema_version: 1\n")
    with pytest.raises(ReferenceFileError, match=r"papers\.yaml: line \d+: duplicate key 'schema_version'"):
        load_reference(p)


@pytest.mark.parametrize(
    "key,where",
    [
        ("training", "training.precision"),
        ("experiments.nlu.training", "experiments.nlu.training.precision"),
        ("methods.full_ft.training", "methods.full_ft.training.precision"),
    ],
)
def test_fp16_on_a_cpu_config_is_refused(repo_root, key, where):
    cfg = default_config(repo_root)
    assert cfg["device"] == "cpu"
    node = cfg
    for part in key.split("."):
        node = node.setdefault(part, {})
    node["precision"] = "fp16"
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}: fp16 needs a CUDA device \(device: cpu\)"):
        validate_config(cfg)
    cfg["device"] = "cuda"
    validate_config(cfg)
