"""Aggregation trusts only records that belong: the runs of the config, intact, of a known schema
version, at the path their spec names. Stale records are reported and left out; damaged ones stop
aggregation with one line naming the file (and the command that reruns it)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from test_claims import REFERENCE, finetune, recursive

from lamda_repro.report_cli import add_cli, aggregate
from lamda_repro.results import RecordError, read_record, rerun_command, stale_records, write_record

FAMILIES = ["nlu"]
BENCH = Path("no-such-bench-folder")  # the same (absent) benchmark for every run: the ledger names it


def _write_clean(runs: Path) -> list[Path]:
    """Three fine-tuning records and one recursive record; their paths (the configured runs)."""
    paths = []
    for rec in (
        finetune("lora_r8", "lora", 8000, score=0.9844),
        finetune("lamda_r8", "lamda", 500, score=0.95),
        finetune("full", "full", 10**6, r=None, score=0.97),
    ):
        rec["schema_version"] = 1
        paths.append(runs / (rec["run_id"] + ".json"))
        write_record(paths[-1], rec)
    rec = recursive("original", 0.5, non_embedding=1000)
    paths.append(runs / "recursive" / "tiny--original.json")
    write_record(paths[-1], rec)
    _write_clean.paths = paths
    return paths


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """The clean records and the tables and ledger aggregated from them (once per module)."""
    root = tmp_path_factory.mktemp("clean")
    paths = _write_clean(root / "runs")
    aggregate(root / "runs", BENCH, REFERENCE, root / "out", FAMILIES, paths)
    return root, _outputs(root / "out")


@pytest.fixture
def clean(tmp_path, clean_run):
    """(runs folder, configured record paths, the clean run's outputs) in a fresh copy; the
    clean outputs are also copied to tmp_path/clean."""
    root, expected = clean_run
    shutil.copytree(root / "runs", tmp_path / "runs")
    shutil.copytree(root / "out", tmp_path / "clean")
    paths = [tmp_path / "runs" / p.relative_to(root / "runs") for p in _write_clean.paths]
    return tmp_path / "runs", paths, expected


def test_clean_records_give_the_same_tables_with_and_without_the_record_list(tmp_path, clean):
    runs, paths, expected = clean
    aggregate(runs, BENCH, REFERENCE, tmp_path / "all", FAMILIES)
    assert _outputs(tmp_path / "all") == expected
    assert "98.44" in expected["tables/nlu.md"].decode()


def test_stale_record_is_reported_once_and_left_out(tmp_path, clean, capsys):
    runs, paths, expected = clean
    old = finetune("dora_r8", "dora", 7000, score=0.1)  # a run no longer in the config
    old["schema_version"] = 1
    write_record(runs / (old["run_id"] + ".json"), old)
    assert stale_records(runs, paths) == [runs / (old["run_id"] + ".json")]
    capsys.readouterr()
    aggregate(runs, BENCH, REFERENCE, tmp_path / "out", FAMILIES, paths)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"aggregate: stale record {runs / (old['run_id'] + '.json')} (its run is not in the config; "
        "left out of the tables)"
    ]
    assert _outputs(tmp_path / "out") == expected


def test_stray_duplicate_is_not_averaged_in(tmp_path, clean, capsys):
    runs, paths, expected = clean
    copy = paths[0].with_name("seed0 (copy).json")  # an older result of the same run, kept by hand
    rec = json.loads(paths[0].read_text())
    rec["metrics"]["accuracy"] = 0.5
    copy.write_text(json.dumps(rec))
    aggregate(runs, BENCH, REFERENCE, tmp_path / "out", FAMILIES, paths)
    assert capsys.readouterr().err.count("stale record") == 1
    assert _outputs(tmp_path / "out") == expected  # 98.44 stays 98.44, not a mean with a copy
    # Read without the list of configured runs, the copy is refused: it is not where its spec says.
    with pytest.raises(RecordError, match=r"seed0 \(copy\)\.json: its spec .* belongs at .*seed0\.json"):
        aggregate(runs, BENCH, REFERENCE, tmp_path / "all", FAMILIES)


def _truncated(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _list_shaped(path: Path) -> None:
    path.write_text(json.dumps([json.loads(path.read_text())]))


def _unknown_version(path: Path) -> None:
    rec = json.loads(path.read_text())
    rec["schema_version"] = 99
    path.write_text(json.dumps(rec))


def _wrong_spec(path: Path) -> None:
    """Another configured run's record copied over this one."""
    shutil.copy(path.with_name("seed0.json").parent.parent / "lamda_r8" / "seed0.json", path)


def _empty(path: Path) -> None:
    path.write_text("")


def _not_utf8(path: Path) -> None:
    path.write_bytes(b'{"run_id": "\xff"}')


FAULTS = {
    "truncated": (_truncated, "truncated or corrupt JSON", True),
    "list-shaped": (_list_shaped, "a record is a JSON object, this file holds a list", True),
    "unknown schema version": (_unknown_version, "unknown schema_version 99", True),
    "spec not matching its path": (
        _wrong_spec,
        "its spec (kind 'finetune', run 'nlu/sst2/m/lamda_r8/seed0')",
        False,
    ),
    "empty": (_empty, "empty", True),
    "not UTF-8": (_not_utf8, "cannot read the record", True),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_damaged_record_stops_aggregation_with_one_line_naming_the_file(tmp_path, clean, capsys, fault):
    runs, paths, expected = clean
    damage, problem, reruns = FAULTS[fault]
    target = paths[0]  # the lora record
    damage(target)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "clean"  # the clean run's folder: nothing in it may change
    argv = ["aggregate", "--runs-dir", str(runs), "--bench-dir", str(BENCH), "--reference"]
    argv += [str(REFERENCE), "--out", str(out), "--families", "nlu", "--records", *map(str, paths)]
    args = parser.parse_args(argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"aggregate: {target}: ") and problem in err[0], err[0]
    assert (rerun_command(target) in err[0]) == reruns
    assert _outputs(out) == expected


def test_rerun_command_quotes_the_path():
    assert (
        rerun_command("results/runs/a b/seed0.json")
        == "snakemake --cores all --force 'results/runs/a b/seed0.json'"
    )


def test_read_record_without_runs_dir_checks_content_only(tmp_path, clean):
    runs, paths, _ = clean
    moved = tmp_path / "elsewhere.json"
    shutil.copy(paths[1], moved)
    assert read_record(moved)["run_id"] == "nlu/sst2/m/lamda_r8/seed0"
    with pytest.raises(RecordError, match="belongs at"):
        read_record(moved, runs)
