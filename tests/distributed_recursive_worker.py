"""One process of tests/test_distributed_recursive.py, started by torchrun (or called in-process
with one rank). Uptrains a tiny recursive model with KD on its slice of each batch, then
post-trains it for early exit, and saves this rank's weights; with --kill-at N, rank 0 kills
itself (SIGKILL) right after the checkpoint of step N is complete; with --cli-run, the job of the
recursive stage (lamda-repro recursive-run) follows, each rank naming its own record path; with
--fsdp, uptraining under FSDP runs too, twice (the second resumes from the first's checkpoint)."""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file

from lamda_repro.recursive import parallel, uptrain
from lamda_repro.recursive.convert import convert_to_recursive, load_causal_lm
from lamda_repro.recursive.early_exit import EarlyExitConfig, train_early_exit
from lamda_repro.recursive.shards import SequenceLoader, TokenShards

UPTRAIN = {"steps": 4, "batch_size": 4, "grad_accum": 2, "seq_len": 16, "lr": 0.01, "warmup_steps": 1}
UPTRAIN |= {"kd_weight": 0.5, "checkpoint_every": 2}
EARLY_EXIT = {"steps": 3, "batch_size": 4, "seq_len": 16, "lr": 0.01, "warmup_steps": 1, "kd_weight": 1.0}


def models(base_dir: Path):
    """(teacher, student): the tiny model as saved, and its relaxed recursive conversion."""
    torch.manual_seed(0)
    teacher = load_causal_lm(str(base_dir), dtype=torch.float32)
    return teacher, convert_to_recursive(teacher, 2, init="average", lora_rank=2, seed=0)


def uptrain_sharded(base_dir: Path, tokens: Path, checkpoints: Path):
    """Uptraining under FSDP, twice into one checkpoint folder: the second run resumes from the
    first one's step-2 checkpoint. (weights, stats) of each, complete on rank 0."""
    rank, world = parallel.rank_and_world()
    cfg = uptrain.UptrainConfig(**UPTRAIN, parallel="fsdp")
    out = []
    for _ in range(2):
        teacher, student = models(base_dir)
        loader = SequenceLoader(TokenShards(tokens, "train"), 16, 4, seed=0, rank=rank, world_size=world)
        ck = uptrain.Checkpointing(checkpoints, "fsdp")
        stats = uptrain.train_causal_lm(student, loader, cfg, teacher=teacher, checkpointing=ck)
        out.append(({k: v.detach().clone() for k, v in student.state_dict().items()}, stats))
    return out


def train(base_dir: Path, tokens: Path, checkpoints: Path, kill_at: int | None = None):
    """(uptrained student, its stats, early-exit post-trained student, its stats) for this rank."""
    rank, world = parallel.rank_and_world()
    teacher, student = models(base_dir)
    shards = TokenShards(tokens, "train")
    if kill_at is not None:
        save = uptrain._save_checkpoint

        def save_then_die(ck, state, *args):
            save(ck, state, *args)
            if state["step"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        uptrain._save_checkpoint = save_then_die
    cfg = uptrain.UptrainConfig(**UPTRAIN)
    loader = SequenceLoader(shards, cfg.seq_len, cfg.batch_size, seed=0, rank=rank, world_size=world)
    stats = uptrain.train_causal_lm(
        student, loader, cfg, teacher=teacher, checkpointing=uptrain.Checkpointing(checkpoints, "test")
    )
    up_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    ee_cfg = EarlyExitConfig(**EARLY_EXIT)
    loader = SequenceLoader(shards, ee_cfg.seq_len, ee_cfg.batch_size, seed=1, rank=rank, world_size=world)
    ee_stats = train_early_exit(student, loader, ee_cfg)
    ee_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return up_state, stats, ee_state, ee_stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--cli-run", help="JSON: section, run id and workdir of a recursive-run job")
    parser.add_argument("--fsdp", action="store_true", help="also uptrain under FSDP (and resume it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parallel.init_from_env("cpu")
    rank = parallel.rank_and_world()[0]
    up, stats, ee, ee_stats = train(args.base, args.tokens, args.out / "checkpoints", args.kill_at)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in up.items()}, args.out / f"uptrain-rank{rank}.safetensors")
    save_file({k: v.contiguous() for k, v in ee.items()}, args.out / f"early_exit-rank{rank}.safetensors")
    (args.out / f"stats-rank{rank}.json").write_text(json.dumps({"uptrain": stats, "early_exit": ee_stats}))
    if args.fsdp:
        (first, first_stats), (second, second_stats) = uptrain_sharded(
            args.base, args.tokens, args.out / "fsdp"
        )
        if rank == 0:
            save_file({k: v.contiguous() for k, v in first.items()}, args.out / "fsdp.safetensors")
            save_file({k: v.contiguous() for k, v in second.items()}, args.out / "fsdp-resumed.safetensors")
            (args.out / "fsdp-stats.json").write_text(json.dumps([first_stats, second_stats]))
    if args.cli_run:
        from lamda_repro.cli import main as cli

        job = json.loads(args.cli_run)
        code = cli(
            ["recursive-run", "--section-json", json.dumps(job["section"]), "--run", job["run"]]
            + [
                "--workdir",
                job["workdir"],
                "--device",
                "cpu",
                "--out",
                str(args.out / f"record-rank{rank}.json"),
            ]
        )
        if code:
            raise SystemExit(code)
    parallel.shutdown()


if __name__ == "__main__":
    main()
