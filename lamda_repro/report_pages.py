"""``lamda-repro report-pages``: the suite's Markdown outputs as HTML pages for the HTML report.

    lamda-repro report-pages results/claims.md results/tables/nlu.md ...

writes ``results/claims.html``, ``results/tables/nlu.html``, ... next to each Markdown file.
Snakemake's report shows images, HTML and PDF in place and offers any other file only as a
download; the tables, the claims ledger and the benchmark summary are Markdown, so each gets an
HTML twin (CommonMark with tables, rendered by markdown-it-py; raw HTML in the Markdown is
escaped) that the report displays. The same Markdown gives byte-identical pages.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from lamda_repro.results import write_text_atomic

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 14px;
       line-height: 1.45; color: #1f2937; margin: 1.5em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
p { max-width: 60em; }
code { background: #f3f4f6; padding: 0 0.2em; border-radius: 3px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #d1d5db; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f3f4f6; text-align: left; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #f9fafb; }
"""


class ReportPageError(ValueError):
    """A Markdown page that cannot be rendered (missing, empty, not .md)."""


def markdown_to_html(markdown: str) -> str:
    """The HTML body of CommonMark text with GitHub-style pipe tables."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)


def page_title(markdown: str, fallback: str) -> str:
    """The first level-1 heading of the Markdown, else ``fallback``."""
    for line in markdown.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return fallback


def html_page(markdown: str, fallback_title: str) -> str:
    """A self-contained HTML page (inline style, no script, no external resource)."""
    title = html.escape(page_title(markdown, fallback_title))
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"{markdown_to_html(markdown)}</body>\n</html>\n"
    )


def write_page(md_path: str | Path) -> Path:
    """Write ``<md_path without .md>.html``; return its path."""
    md_path = Path(md_path)
    if md_path.suffix != ".md":
        raise ReportPageError(f"{md_path}: not a Markdown file (.md)")
    if not md_path.is_file():
        raise ReportPageError(f"{md_path}: no such file")
    text = md_path.read_text(encoding="utf-8")
    if not text.strip():
        raise ReportPageError(f"{md_path}: empty")
    out = md_path.with_suffix(".html")
    write_text_atomic(out, html_page(text, md_path.stem))
    return out


def run_report_pages(args: argparse.Namespace) -> int:
    try:
        for md in args.markdown:
            print(f"wrote {write_page(md)}")
    except ReportPageError as exc:
        print(f"report-pages: {exc}", file=sys.stderr)
        return 2
    return 0


def add_cli(subparsers) -> None:
    """Register the ``report-pages`` subcommand."""
    p = subparsers.add_parser(
        "report-pages",
        help="Markdown outputs -> HTML pages for the HTML report",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("markdown", nargs="+", help="Markdown files; each gets an .html twin beside it")
    p.set_defaults(func=run_report_pages)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m lamda_repro.report_pages <files>``)."""
    parser = argparse.ArgumentParser(prog="lamda-repro")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report-pages", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
