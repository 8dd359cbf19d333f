"""Nothing in a config reaches a shell unquoted, and no name can run a command or leave the project.

- every placeholder in every rule's shell command is quoted (``{x:q}``);
- a dry run with hostile folder names prints commands in which each path is one argument;
- hostile names (``;``, ``$(...)``, quotes, spaces, ``/``, ``..``, a leading ``-``) stop
  ``lamda-repro validate`` and Snakemake before any job with one line, and create no file in the
  project, its parent or the temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lamda_repro.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
RULE_FILES = sorted((REPO / "workflow" / "rules").glob("*.smk")) + [REPO / "Snakefile"]
WORKFLOW_FILES = ["Snakefile", "environment.yml", "workflow", "config", "profiles", "results/reference"]


def _shell_commands(path: Path) -> list[tuple[str, str]]:
    """(rule, shell command text) of every rule in a Snakemake file."""
    out, rule, block = [], None, None
    for line in path.read_text().splitlines():
        m = re.match(r"^rule (\w+):", line)
        if m:
            rule = m.group(1)
        if re.match(r"^\s+shell:\s*$", line):
            block = []
            out.append((rule, block))
            continue
        if block is not None:
            if re.match(r'^\s+"', line):
                block.append(line.strip())
            else:
                block = None
    return [(r, " ".join(b)) for r, b in out]


# The one placeholder that is shell text on purpose: the torchrun / srun launcher, which must
# expand "$SLURM_JOB_ID" and the allocation's first node on the compute node. It is built by
# lamda_repro.cluster.launcher from integers (GPUs, nodes, CPUs) and fixed text only, so no name of
# the config reaches it (test_the_launcher_takes_only_integers_from_the_config).
SHELL_TEXT = {"params.launcher"}


def test_every_placeholder_of_every_shell_command_is_quoted():
    commands = [(f.name, rule, cmd) for f in RULE_FILES for rule, cmd in _shell_commands(f)]
    shells = sum(len(re.findall(r"^\s+shell:", f.read_text(), re.M)) for f in RULE_FILES)
    assert len(commands) == shells >= 13  # every shell command was found and read
    unquoted = [
        f"{name}:{rule}: {{{ph}}}"
        for name, rule, cmd in commands
        for ph in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", cmd)
        if not ph.endswith(":q") and ph not in SHELL_TEXT
    ]
    assert not unquoted, unquoted


def test_the_launcher_takes_only_integers_from_the_config():
    from lamda_repro.cluster import launcher

    for hostile in HOSTILE:
        for training in ({"gpus": hostile, "nodes": 2}, {"gpus": 4, "nodes": hostile}):
            with pytest.raises((ValueError, TypeError)):
                launcher(training, "cuda")
    line = launcher({"gpus": 4, "nodes": 2}, "cuda", cpus_per_gpu=8)
    assert "$(scontrol show hostnames" in line and '"$SLURM_JOB_ID"' in line


def test_the_placeholder_check_sees_an_unquoted_one(tmp_path):
    rules = tmp_path / "x.smk"
    rules.write_text('rule x:\n    shell:\n        "run --out {output:q}"\n        " --x {log} > {log:q}"\n')
    [(rule, cmd)] = _shell_commands(rules)
    assert rule == "x" and re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", cmd) == ["output:q", "log", "log:q"]


HOSTILE = ["x;touch PWNED", "$(touch PWNED)", "it's", 'q"uote', "a b", "a/b", "..", "-rf"]


def _renamed(cfg: dict, section: list[str], old: str, new: str) -> dict:
    """The config with entry ``old`` of ``section`` renamed to ``new`` and every reference to it."""
    text = json.dumps(cfg)
    esc = json.dumps(new)[1:-1]
    text = text.replace(f'"{old}"', f'"{esc}"').replace(f'"{old}--', f'"{esc}--')
    return json.loads(text)


# (section path, an entry of the smoke config to rename, key path the error names)
SITES = [
    (["methods"], "full_ft", "methods"),
    (["experiments"], "nlu", "experiments"),
    (["tasks"], "smoke_sst2", "tasks"),
    (["models"], "minilm", "models"),
    (["data"], "sentiment", "data"),
    (["recursive", "models"], "tiny", "recursive.models"),
    (["methods"], "lora_r8", "methods"),
    (["tasks"], "smoke_stsb", "tasks"),
]
CASES = list(zip(HOSTILE, SITES, strict=True))
SNAKEMAKE_CASES = ["x;touch PWNED", "$(touch PWNED)", "it's", "a/b", ".."]


def _names_key(line: str, name: str, where: str) -> bool:
    """Whether ``line`` is one config error naming the key that holds ``name``: its section, or
    (renamed references come first in key order) a list that refers to it."""
    m = re.match(r"^config error: ([\w.\[\]]+): name (.+) is not allowed \(", line)
    return bool(m) and m.group(2) == repr(name) and m.group(1).startswith((where, "experiments", "tasks."))


def _smoke_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("name,site", CASES, ids=[f"{s[2]}={n!r}" for n, s in CASES])
def test_validate_refuses_hostile_names_with_one_line(tmp_path, capsys, name, site):
    section, old, where = site
    cfg = _renamed(_smoke_config(), section, old, name)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and _names_key(err[0], name, where), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def _copy_workflow(root: Path) -> None:
    for item in WORKFLOW_FILES:
        src, dst = REPO / item, root / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)


def _files(root: Path, skip: str | None = None) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not (skip and p.relative_to(root).parts[:1] == (skip,))
    }


def _snakemake(cwd: Path, tmp: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmp)
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_snakemake_refuses_hostile_names_before_any_job_and_creates_nothing(tmp_path):
    """Each hostile name (at a different site) stops Snakemake with one `config error:` line
    naming the section; no file appears in the project (apart from Snakemake's own .snakemake/
    bookkeeping), in its parent, or in the temporary folder."""
    parent = tmp_path / "parent"
    project = parent / "project"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    _copy_workflow(project)
    configs = tmp_path / "configs"
    configs.mkdir()
    before_project, before_parent = _files(project), _files(parent, skip="project")
    # Five of the cases (each costs a Snakemake start); validate sees all of them above.
    for i, (name, (section, old, where)) in enumerate(c for c in CASES if c[0] in SNAKEMAKE_CASES):
        path = configs / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(_renamed(_smoke_config(), section, old, name)))
        proc = _snakemake(project, tmp, "--cores", "1", "--configfile", str(path))
        assert proc.returncode != 0, (name, proc.stdout[-2000:])
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln.lower()]
        assert len(lines) == 1 and _names_key(lines[0], name, where), (name, lines)
        assert "Job stats" not in proc.stdout + proc.stderr
    assert _files(project, skip=".snakemake") == {p for p in before_project if not p.startswith(".snakemake")}
    assert _files(parent, skip="project") == before_parent
    assert _files(tmp) == set()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("PWNED"))


@pytest.mark.slow
def test_hostile_folder_names_reach_every_job_as_one_argument(tmp_path):
    """Folders are paths, not names: they may hold any character, and every job command still
    passes each path as one shell word (checked on the commands a dry run prints)."""
    project, tmp = tmp_path / "project", tmp_path / "tmp"
    tmp.mkdir()
    _copy_workflow(project)
    dirs = {"results_dir": "res dir/$(touch PWNED);x", "workdir": "wk 'dir", "logs_dir": 'lg "d'}
    cfg = {**_smoke_config(), **dirs}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = _snakemake(project, tmp, "-n", "-p", "--cores", "1", "--configfile", str(tmp_path / "c.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [
        line.split("Shell command: ", 1)[1]
        for line in proc.stdout.splitlines()
        if line.startswith("Shell command: ") and line != "Shell command: None"
    ]
    assert len(commands) > 20
    path_flags = {"--out", "--out-dir", "--workdir", "--out-stem", "--figure", "--runs-dir", "--bench-dir"}
    path_flags |= {"--data-files", "--records", "--early-exit-records", "--source-record", "--table-stem"}
    seen = set()
    for cmd in commands:
        words = shlex.split(cmd)
        for flag in path_flags & set(words):
            seen.add(flag)
            value = words[words.index(flag) + 1]
            assert any(value == d or value.startswith(d + "/") for d in dirs.values()), (flag, value, cmd)
        log = words[words.index(">" if ">" in words else "tee") + 1]  # `> log` or `| tee log`
        assert log.startswith(dirs["logs_dir"] + "/"), cmd
    assert seen == path_flags
    # (a dry run imports torch, which may set up its own cache folder in the temporary folder)
    assert not [p for p in (*project.rglob("*PWNED*"), *tmp.rglob("*PWNED*"), *tmp_path.glob("PWNED"))]


@pytest.mark.slow
def test_snakemake_refuses_a_config_file_with_a_duplicate_key(tmp_path):
    """Snakemake reads config files keeping the last of two equal keys; the workflow reads them
    again and stops with one line naming the file, the line and the key."""
    project, tmp = tmp_path / "project", tmp_path / "tmp"
    tmp.mkdir()
    _copy_workflow(project)
    text = (REPO / "config" / "config.yaml").read_text()
    assert "\nthreads: " in text
    bad = tmp_path / "dup.yaml"
    bad.write_text(text + "\nthreads: 2\n")
    proc = _snakemake(project, tmp, "-n", "--cores", "1", "--configfile", str(bad))
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln.lower()]
    expected = (
        rf"config error: {re.escape(str(bad))}: line \d+: duplicate key 'threads' \(first given on line \d+\)"
    )
    assert len(lines) == 1 and re.fullmatch(expected, lines[0]), lines
