"""``lamda-repro aggregate``: run records -> tables, figures and the claims ledger.

    lamda-repro aggregate --runs-dir results/runs --bench-dir results/bench \\
        --reference results/reference/papers.yaml --out results --families nlu,summarization \\
        [--records results/runs/<run>.json ...]

With ``--records`` (the workflow passes the records of the runs in its config) only those files
are read, and every other record below ``--runs-dir`` is reported as stale (one line each) and
left out; without it, every record below ``--runs-dir`` is read. Each record must be intact, of
a known schema version, and sit at the path its spec names (lamda_repro.results.read_record).

With ``--families`` the set of files written is fixed in advance (``aggregate_outputs``), so the
workflow can list them as outputs; a family without records still gets its table ("no runs yet")
and its figures. The same records give byte-identical files.

With ``--workers N`` (N > 1) the figures (most of the command's time: matplotlib) are drawn in
N forked processes while this one writes the tables and the ledger (a few seconds); the files
are the same.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from lamda_repro.results import find_records, load_records, stale_records, write_text_atomic
from lamda_repro.tables import FINETUNE_FAMILIES

TABLES_DIR = "tables"
FIGURES_DIR = "figures"
CLAIMS_FILE = "claims.md"
TABLE_FORMATS = ("md", "tex", "csv")


class AggregateError(ValueError):
    """Bad arguments to ``aggregate``."""


def parse_families(text: str | None) -> list[str] | None:
    """``"nlu,summarization"`` -> ["nlu", "summarization"]; None/"" -> None (= from the records)."""
    if not text:
        return None
    families = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in families if f not in FINETUNE_FAMILIES]
    if unknown:
        raise AggregateError(
            f"unknown families {unknown}; known: {', '.join(FINETUNE_FAMILIES)} "
            "(recursive records have their own table: recursive-table)"
        )
    return sorted(set(families), key=families.index)


def aggregate_outputs(out: str | Path, families: list[str]) -> list[str]:
    """Every file ``aggregate --families <families>`` writes below ``out`` (in a fixed order)."""
    from lamda_repro.figures import figure_names

    out = Path(out)
    paths = []
    for stem in [*families, "measurements", "smoke_checks"]:
        paths += [str(out / TABLES_DIR / f"{stem}.{fmt}") for fmt in TABLE_FORMATS]
    paths.append(str(out / TABLES_DIR / "runs.csv"))
    for family in families:
        paths += [str(out / FIGURES_DIR / name) for name in figure_names(family)]
    paths.append(str(out / CLAIMS_FILE))
    return paths


def aggregate(
    runs_dir: str | Path,
    bench_dir: str | Path | None,
    reference_path: str | Path,
    out: str | Path,
    families: list[str] | None = None,
    records: list[str | Path] | None = None,
    workers: int = 1,
    configfiles: list[str] | None = None,
) -> list[str]:
    """Write every table, figure and the claims ledger; return the paths written.

    ``records``: the record files to read (the runs of the config); others below ``runs_dir``
    are reported as stale on stderr and left out. None: every record below ``runs_dir``.
    ``workers`` > 1: draw the figures in ``workers`` forked processes meanwhile. ``configfiles``:
    the workflow's config files, named in the rerun command of a damaged record's error."""
    if workers < 1:
        raise AggregateError(f"--workers must be at least 1, got {workers}")
    from lamda_repro import tables
    from lamda_repro.claims import Evidence, claims_markdown, evaluate_claims, load_reference, suite_findings
    from lamda_repro.figures import write_family_figures

    reference = load_reference(reference_path)
    if records is None:
        records = find_records(runs_dir)
    else:
        for path in stale_records(runs_dir, records):
            print(
                f"aggregate: stale record {path} (its run is not in the config; left out of the tables)",
                file=sys.stderr,
            )
        records = load_records(records, runs_dir, configfiles or ())
    out = Path(out)
    tables_dir, figures_dir = out / TABLES_DIR, out / FIGURES_DIR

    frame = tables.finetune_frame(records, reference.paper_models)
    cells = tables.cell_summary(frame)
    present = sorted(set(frame["family"]))
    if families is None:
        families = [f for f in FINETUNE_FAMILIES if f in present] + sorted(
            f for f in present if f not in FINETUNE_FAMILIES
        )
    extra = [f for f in present if f not in families]
    if extra:
        print(
            f"aggregate: records of families {extra} are not in --families; writing their "
            "tables and figures too",
            file=sys.stderr,
        )

    written = []
    scale_note = _scale_note(frame)
    all_families = [*families, *extra]
    # The figures do not depend on the tables: with workers, forked children draw them meanwhile.
    drawn = all_families if workers > 1 else []
    pool = (
        ProcessPoolExecutor(min(workers, len(drawn)), mp_context=multiprocessing.get_context("fork"))
        if drawn
        else nullcontext()
    )
    with pool:
        figures = {family: pool.submit(write_family_figures, cells, family, figures_dir) for family in drawn}
        slots = {}  # where each family's figure paths go in `written` (after its table's files)
        for family in all_families:
            table = tables.family_table(cells, family, reference)
            notes = [
                scale_note,
                "Rows: methods (`this suite` = seed mean ± std of the run records; `paper` = the "
                "reference file's numbers, a row only where it holds one, `n/a` for the others). "
                "Cells: `failed` = a run failed, `—` = no run, `n/a (no Java)` = METEOR could not "
                "run here. Accuracy-type metrics in percent points; `avg` only when every task "
                "succeeded (higher-is-better metrics). `ranks` = the LaMDA / LaMDA++ rank histogram "
                "(rank×matrices).",
            ]
            uniform = tables.uniform_allocation_note(cells, family)
            if uniform:
                notes.append(uniform)
            written += tables.write_table(
                table, tables_dir / family, tables.FAMILY_TITLES.get(family, family), notes
            )
            if family in figures:
                slots[family] = len(written)
            else:
                written += write_family_figures(cells, family, figures_dir)
        written += tables.write_table(
            tables.measurements_table(cells),
            tables_dir / "measurements",
            "Measurements",
            [
                scale_note,
                "`X LoRA/this` = the LoRA run of the same experiment/task/model at the "
                "same rank divided by this run (higher = this method needs less). Bytes are exact "
                "(parameters, gradients, optimizer state, activations saved for backward); peak "
                "memory is the allocator peak on CUDA and the process high-water mark on CPU.",
            ],
        )
        checks, outcomes = tables.smoke_checks(cells)
        written += tables.write_table(
            checks,
            tables_dir / "smoke_checks",
            "LaMDA against LoRA and full fine-tuning",
            [scale_note, tables.SMOKE_CHECKS_NOTE],
        )
        runs_csv = tables_dir / "runs.csv"
        write_text_atomic(runs_csv, tables.to_csv(frame))
        written.append(str(runs_csv))

        evidence = Evidence.from_records(records, bench_dir, reference.paper_models)
        ledger = claims_markdown(
            evaluate_claims(reference, evidence),
            bench_note=evidence.bench_note,
            findings=[*suite_findings(evidence), _checks_finding(outcomes, frame)],
        )
        claims_path = out / CLAIMS_FILE
        write_text_atomic(claims_path, ledger)
        written.append(str(claims_path))
        # the last slot first, so that the earlier ones keep their index
        for family in reversed(drawn):
            written[slots[family] : slots[family]] = figures[family].result()
    return written


def _checks_finding(outcomes, frame) -> dict[str, str]:
    from lamda_repro import tables

    scales = ", ".join(sorted(set(frame["scale"]))) if outcomes else "—"
    return {
        "id": "lamda_vs_lora_tolerances",
        "finding": "LaMDA against LoRA (equal rank) and full fine-tuning, per run, with the stated "
        f"tolerances of `tables/smoke_checks.md` (within {tables.LAMDA_VS_LORA_TOLERANCE:g} points of "
        f"LoRA, {tables.VS_FULL_MARGIN:g} of full FT; fewer trainable parameters, updates and saved "
        "activations than LoRA)",
        "this suite": tables.smoke_checks_summary(outcomes),
        "scale": scales,
    }


def _scale_note(frame) -> str:
    if frame.empty:
        return "No fine-tuning runs yet."
    scales = sorted(set(frame["scale"]))
    return f"Scale of the runs: {', '.join(scales)} (smoke numbers are not paper numbers)."


def run_aggregate(args: argparse.Namespace) -> int:
    try:
        families = parse_families(args.families)
        written = aggregate(
            args.runs_dir,
            args.bench_dir,
            args.reference,
            args.out,
            families,
            args.records,
            args.workers,
            args.configfile,
        )
    except ValueError as exc:
        print(f"aggregate: {exc}", file=sys.stderr)
        return 2
    tables_n = sum(1 for p in written if f"/{TABLES_DIR}/" in p)
    figures_n = sum(1 for p in written if f"/{FIGURES_DIR}/" in p)
    out = Path(args.out)
    print(
        f"wrote {tables_n} table files to {out / TABLES_DIR}, {figures_n} figure files to "
        f"{out / FIGURES_DIR}, claims ledger to {out / CLAIMS_FILE}"
    )
    return 0


def add_cli(subparsers) -> None:
    """Register the ``aggregate`` subcommand."""
    p = subparsers.add_parser(
        "aggregate",
        help="run records -> tables, figures, claims ledger",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--runs-dir", default="results/runs", help="root of the run records")
    p.add_argument(
        "--bench-dir", default="results/bench", help="folder of the LaMDA benchmark output (lamda_bench.json)"
    )
    p.add_argument(
        "--reference", default="results/reference/papers.yaml", help="reference file of the papers' numbers"
    )
    p.add_argument("--out", default="results", help="writes tables/, figures/ and claims.md here")
    p.add_argument(
        "--families",
        default=None,
        help="comma-separated fine-tuning families to write tables/figures for "
        f"({','.join(FINETUNE_FAMILIES)}); default: those present in the records",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="with more than 1, the figures are drawn in this many forked processes while the "
        "tables and the ledger are written (default 1: all in this process)",
    )
    p.add_argument(
        "--records",
        nargs="*",
        default=None,
        help="read exactly these record files (the runs of the config); other records below "
        "--runs-dir are reported as stale. Default: every record below --runs-dir",
    )
    p.add_argument(
        "--configfile",
        nargs="*",
        default=None,
        help="the workflow's config files: a damaged record's error names them in its rerun command",
    )
    p.set_defaults(func=run_aggregate)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m lamda_repro.report_cli aggregate ...``)."""
    parser = argparse.ArgumentParser(prog="lamda-repro")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
