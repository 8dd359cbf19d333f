"""Local data files and model folders: checked at validation (they exist) and at load (columns,
rows, UTF-8, labels) with one line naming the file and the problem, before any training."""

from __future__ import annotations

import json

import pytest

import lamda_repro.recursive  # noqa: F401  (registers the check of the recursive section)
from lamda_repro.config import ConfigError, RunSpec, load_config, validate_config
from lamda_repro.tasks.base import DataFileError, check_data_file
from lamda_repro.tasks.glue import GlueTask


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}]


def _sst2(tmp_path, train_rows=GOOD, raw: bytes | None = None, name="train.jsonl"):
    train = tmp_path / name
    if raw is not None:
        train.write_bytes(raw)
    else:
        _jsonl(train, train_rows)
    validation = _jsonl(tmp_path / "validation.jsonl", GOOD)
    return GlueTask(
        "sst2", {"type": "glue", "subset": "sst2"}, {"train": str(train), "validation": str(validation)}
    )


BAD_LABEL = [*GOOD, {"sentence": "x", "label": 2}]
BROKEN_LINE = b'{"sentence": "x", "label": 1}\n{"sentence": \n'
FAULTS = {
    "missing file": (dict(name="absent.jsonl", raw=None), "data file not found"),
    "empty file": (dict(raw=b""), "empty (no rows)"),
    "blank lines only": (dict(raw=b"\n\n"), "empty (no rows)"),
    "missing column": (dict(train_rows=[{"text": "x", "label": 0}]), "row 1: missing column 'sentence'"),
    "not UTF-8": (dict(raw=b'{"sentence": "caf\xe9", "label": 1}\n'), "not UTF-8 (byte 0xe9 at offset 17)"),
    "label out of range": (
        dict(train_rows=[*GOOD, {"sentence": "x", "label": 2}]),
        "row 3: label 2 out of range",
    ),
    "label not an integer": (
        dict(train_rows=[{"sentence": "x", "label": "pos"}]),
        "label 'pos' out of range",
    ),
    "broken JSON line": (
        dict(raw=b'{"sentence": "x", "label": 1}\n{"sentence": \n'),
        "line 2: not valid JSON",
    ),
    "row not an object": (dict(raw=b"[1, 2]\n"), "row 1: expected an object of columns, got int"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_data_file_is_named_with_its_problem_before_loading(tmp_path, fault):
    kwargs, problem = FAULTS[fault]
    task = _sst2(tmp_path, **kwargs)
    if kwargs.get("name") == "absent.jsonl":
        (tmp_path / "absent.jsonl").unlink()
    with pytest.raises(DataFileError) as info:
        task.load_splits()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / kwargs.get("name", "train.jsonl")) + ": "), msg
    assert problem in msg, msg


def test_good_files_load_and_the_check_counts_rows(tmp_path):
    task = _sst2(tmp_path)
    assert len(task.load_splits()["train"]) == 2
    assert check_data_file(tmp_path / "train.jsonl", ("sentence", "label"), 2) == 2


def test_csv_and_json_array_files_are_checked_too(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("sentence,label\nok,1\nbad,5\n")
    with pytest.raises(DataFileError, match=r"t\.csv: row 3: label '5' out of range"):
        check_data_file(csv, ("sentence", "label"), 2)
    arr = tmp_path / "t.json"
    arr.write_text(json.dumps([{"sentence": "x"}]))
    with pytest.raises(DataFileError, match=r"t\.json: row 1: missing column 'label'"):
        check_data_file(arr, ("sentence", "label"), 2)
    with pytest.raises(DataFileError, match=r"unsupported data file type \.txt"):
        (tmp_path / "t.txt").write_text("x")
        check_data_file(tmp_path / "t.txt")


def test_a_failed_data_check_fails_the_run_before_the_model_loads(tmp_path):
    """Through the run entry point: the record says failed with the file's one-line problem, and
    the (absent) model was never loaded."""
    from lamda_repro.train import run_finetune

    bad = tmp_path / "train.jsonl"
    bad.write_text("")
    good = _jsonl(tmp_path / "validation.jsonl", GOOD)
    files = {"train": str(bad), "validation": str(good)}
    spec = RunSpec(
        experiment="e",
        family="nlu",
        task="t",
        task_params={
            "type": "glue",
            "subset": "sst2",
            "data_files": files,
        },
        model="m",
        model_params={"source": "local", "path": str(tmp_path / "no-model")},
        method="full",
        method_type="full",
        method_params={"type": "full"},
        seed=0,
        training={"lr": 1e-4},
    )
    rec = run_finetune(spec, tmp_path / "r.json", workdir=str(tmp_path), device="cpu")
    assert rec["status"] == "failed"
    assert rec["error"] == f"DataFileError: {bad}: empty (no rows)"


# -- at validation -------------------------------------------------------------------------


def _config(repo_root):
    return load_config(repo_root / "config" / "config.yaml")


def test_missing_local_data_file_is_refused_at_validation(repo_root, tmp_path):
    cfg = _config(repo_root)
    good = _jsonl(tmp_path / "train.jsonl", GOOD)
    cfg["tasks"]["local_sst2"] = {
        "type": "glue",
        "subset": "sst2",
        "data_files": {"train": str(good), "validation": str(tmp_path / "nope.jsonl")},
    }
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert (
        str(info.value)
        == f"tasks.local_sst2.data_files.validation: data file not found: {tmp_path / 'nope.jsonl'}"
    )


def test_missing_local_model_folder_is_refused_at_validation(repo_root, tmp_path):
    cfg = _config(repo_root)
    cfg["models"]["mine"] = {"source": "local", "path": str(tmp_path / "absent")}
    with pytest.raises(ConfigError, match=r"^models\.mine\.path: model folder not found: "):
        validate_config(cfg)
    (tmp_path / "absent").mkdir()
    validate_config(cfg)


def test_missing_recursive_corpus_file_and_local_model_folder_are_refused(repo_root, tmp_path):
    cfg = _config(repo_root)
    cfg["recursive"]["corpus"] = {"kind": "files", "data_files": {"train": str(tmp_path / "c.jsonl")}}
    with pytest.raises(ConfigError, match=r"^recursive\.corpus\.data_files\.train: data file not found"):
        validate_config(cfg)
    cfg = _config(repo_root)
    model = next(iter(cfg["recursive"]["models"]))
    cfg["recursive"]["models"][model] = {"path": str(tmp_path / "absent")}
    with pytest.raises(ConfigError, match=rf"^recursive\.models\.{model}\.path: model folder not found"):
        validate_config(cfg)
