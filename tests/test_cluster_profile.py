"""The cluster profile as users type it, and the jobs' cluster requests in the dry run's listing:
`snakemake --profile slurm` works in the project root, the rules carry GPUs, memory and runtime
sized from the config, and every override the README shows changes only the key it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_paper_grid import _dry_run

from lamda_repro.cluster import LOCAL_RULES, build_model_is_local, job_resources

REPO = Path(__file__).resolve().parents[1]


def _jobs(text: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job in a dry run's listing."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        head = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if head and res:
            pairs = (item.split("=", 1) for item in res.group(1).split(", ") if "=" in item)
            jobs.append((head.group(1), {k: v for k, v in pairs}))
    return jobs


def _by_rule(jobs, rule):
    found = [res for name, res in jobs if name == rule]
    assert found, f"no {rule} job in the dry run"
    return found


def test_profile_is_found_by_name_in_the_project_root():
    # Snakemake looks a profile name up as a folder of the working directory; profiles/slurm is
    # the same folder.
    assert (REPO / "slurm" / "config.v8+.yaml").is_file()
    assert (REPO / "profiles" / "slurm").resolve() == (REPO / "slurm").resolve()
    text = (REPO / "slurm" / "config.v8+.yaml").read_text()
    assert "\nset-resources:" not in text  # per-rule requests live in the rules, not the profile


@pytest.fixture(scope="module")
def paper_overridden():
    """The paper grid through `--profile slurm` with the README's overrides."""
    proc = _dry_run(
        "--profile",
        "slurm",
        "--configfile",
        "config/paper.yaml",
        "--set-resources",
        "finetune:runtime=1440",
        "--default-resources",
        "slurm_partition=gpu",
        "slurm_account=proj",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _jobs(proc.stdout + proc.stderr)


def test_one_override_changes_one_key_and_site_keys_remove_nothing(paper_overridden):
    finetune = _by_rule(paper_overridden, "finetune")
    assert len(finetune) > 200
    for res in finetune:
        assert (res["gpu"], res["cpus_per_gpu"], res["mem_mb"], res["runtime"]) == ("1", "8", "64000", "1440")
        assert (res["slurm_partition"], res["slurm_account"]) == ("gpu", "proj")
    for res in _by_rule(paper_overridden, "recursive_run"):
        assert (res["gpu"], res["mem_mb"], res["runtime"]) == ("1", "128000", "4320")
        assert res["slurm_partition"] == "gpu"
    assert _by_rule(paper_overridden, "bench")[0]["gpu"] == "1"


def test_gpu_override_and_cpu_switch_keep_memory_and_runtime():
    # `--set-resources finetune:gpu=0` used to drop memory and runtime to the defaults; the
    # `device: cpu` switch (a CPU-only cluster) asks for no GPU anywhere and CPUs instead.
    proc = _dry_run(
        "--profile",
        "profiles/slurm",
        "--configfile",
        "config/paper.yaml",
        "--config",
        "device=cpu",
        "cluster={partition: cpu, qos: long, gpu_model: a100}",
        "--set-resources",
        "finetune:gpu=0",
        "recursive_run:mem_mb=200000",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(proc.stdout + proc.stderr)
    for res in _by_rule(jobs, "finetune"):
        assert (res["gpu"], res["mem_mb"], res["runtime"], res["qos"]) == ("0", "64000", "720", "long")
        assert "gpu_model" not in res and "cpus_per_gpu" not in res and int(res["cpus_per_task"]) >= 1
    for res in _by_rule(jobs, "recursive_run"):
        got = (res["gpu"], res["mem_mb"], res["runtime"], res["slurm_partition"])
        assert got == ("0", "200000", "4320", "cpu")
    # the paper config's bench says `device: cuda`; `device=cpu` wins there too
    (bench,) = _by_rule(jobs, "bench")
    assert bench["gpu"] == "0" and "cpus_per_gpu" not in bench and "gpu_model" not in bench
    assert all(res["gpu"] == "0" for _, res in jobs if "gpu" in res)


def test_job_resources_from_config():
    cfg = {"scale": "paper", "device": "cuda", "threads": 8}
    assert job_resources(cfg, "finetune") == {
        "mem_mb": 64000,
        "runtime": 720,
        "gpu": 1,
        "cpus_per_gpu": 8,
        "slurm_extra": "--signal=TERM@600 --requeue",  # the run checkpoints before the time limit
    }
    site = {"partition": "gpu", "account": "a", "qos": "q", "gpu_model": "h100", "gpus": 2}
    own = {"jobs": {"recursive_run": {"mem_mb": 1000, "runtime": 5, "partition": "long"}}}
    res = job_resources({**cfg, "cluster": {**site, **own}}, "recursive_run")
    assert res == {
        "mem_mb": 1000,
        "runtime": 5,
        "gpu": 2,
        "cpus_per_gpu": 8,
        "slurm_partition": "long",
        "slurm_account": "a",
        "qos": "q",
        "gpu_model": "h100",
        "slurm_extra": "--signal=TERM@600 --requeue",
    }
    assert job_resources(cfg, "finetune", gpus=4)["gpu"] == 4
    smoke = job_resources({"scale": "smoke", "device": "cpu", "threads": 1}, "finetune")
    assert smoke == {
        "mem_mb": 4000,
        "runtime": 30,
        "gpu": 0,
        "cpus_per_task": 1,
        "slurm_extra": "--signal=TERM@60 --requeue",
    }
    # CPU-only rules never ask for a GPU
    assert job_resources(cfg, "recursive_relax_error")["gpu"] == 0


def test_light_rules_are_local():
    text = (REPO / "Snakefile").read_text()
    declared = re.search(r"^localrules:\n((?:    \w+,\n)+)", text, re.M).group(1).split()
    assert sorted(r.rstrip(",") for r in declared) == sorted(r for r in LOCAL_RULES if r != "all")
    assert "localrule: True" in text.split("rule all:")[1]
    # building a tiny model is light, pretraining it is training: then it is a cluster job
    built = {"source": "build", "tokenizer": {}, "config": {}}
    assert build_model_is_local({"models": {"m": built, "hub": {"source": "hub", "pretrain": {}}}})
    assert not build_model_is_local({"models": {"m": {**built, "pretrain": {"steps": 10}}}})
    rules = (REPO / "workflow" / "rules" / "finetune.smk").read_text().split("rule build_model:")[1]
    assert "localrule: build_model_is_local(CFG)" in rules.split("\nrule ")[0]


def test_several_gpus_start_the_run_with_torchrun_and_ask_slurm_for_them(tmp_path):
    import yaml

    from lamda_repro.cluster import launcher

    assert launcher({"gpus": 4}, "cuda") == "torchrun --standalone --nproc-per-node=4 --no-python"
    assert launcher({"gpus": 4}, "cpu") == "" and launcher({}, "cuda") == ""
    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    cfg["experiments"]["gsm8k"]["training"] = {
        **cfg["experiments"]["gsm8k"].get("training", {}),
        "gpus": 4,
        "distributed": "fsdp",
    }
    cfg["experiments"]["e2e"]["training"] = {
        **cfg["experiments"]["e2e"].get("training", {}),
        "gpus": 4,
        "nodes": 2,
    }
    cfg["recursive"]["launch"] = {"gpus": 4, "nodes": 2}  # every uptraining job on 2 nodes x 4 GPUs
    (tmp_path / "paper4.yaml").write_text(yaml.safe_dump(cfg))
    proc = _dry_run("-p", "--profile", "slurm", "--configfile", str(tmp_path / "paper4.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    jobs = [(rule, res) for rule, res in _jobs(text) if rule == "finetune"]
    outputs = re.findall(r"rule finetune:\n(?:    input: .*\n)?    output: [\w-]+/runs/(\w+)/", text)
    assert len(outputs) == len(jobs) > 200
    for (_, res), experiment in zip(jobs, outputs, strict=True):
        assert res["gpu"] == {"gsm8k": "4", "e2e": "0"}.get(experiment, "1"), experiment
        assert res["cpus_per_gpu"] == "8" and res["mem_mb"] == "64000"
        # nodes 2 x gpus 4: two nodes with 4 GPUs each, one task (one torchrun) per node
        multi = experiment == "e2e"
        assert res["nodes"] == ("2" if multi else "1") and res["tasks"] == res["nodes"]
        assert res["gres"] == ("gpu:4" if multi else "") and res["mpi"] == ("srun" if multi else "")
        assert ("--ntasks-per-node=1" in res["slurm_extra"]) == multi and "--signal=TERM@600" in res[
            "slurm_extra"
        ]
    commands = [c.strip() for c in re.findall(r"^Shell command:(.*lamda-repro run --spec .*)$", text, re.M)]
    assert len(commands) == len(jobs)
    gsm8k = [c for c in commands if '"experiment": "gsm8k"' in c]
    assert gsm8k and all(
        c.startswith("torchrun --standalone --nproc-per-node=4 --no-python lamda-repro run") for c in gsm8k
    )
    e2e = [c for c in commands if '"experiment": "e2e"' in c]
    first_node = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
    assert e2e and all(
        c.startswith(
            "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 "
            'torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-id="$SLURM_JOB_ID" '
            f"--rdzv-endpoint={first_node}:29500 "
            "--no-python lamda-repro run"
        )
        for c in e2e
    )
    assert all(c.startswith("lamda-repro run") for c in commands if c not in gsm8k + e2e)
    uptraining = [res for rule, res in _jobs(text) if rule == "recursive_run"]
    assert uptraining and all(
        res["nodes"] == "2" and res["gres"] == "gpu:4" and res["tasks"] == "2" and res["mpi"] == "srun"
        for res in uptraining
    )
    rec_commands = re.findall(r"^Shell command:(.*lamda-repro (?:--online )?recursive-run .*)$", text, re.M)
    assert len(rec_commands) == len(uptraining)
    assert all(
        c.strip().startswith("srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=")
        and "--nproc-per-node=4" in c
        for c in rec_commands
    )
    assert all('"distributed": "fsdp", ' in c and '"gpus": 4' in c for c in gsm8k)
