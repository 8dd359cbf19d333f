"""HTML pages of the Markdown outputs, for the HTML report."""

from __future__ import annotations

import pytest

from lamda_repro import report_pages


def test_a_markdown_table_becomes_an_html_table_with_its_title(tmp_path):
    md = tmp_path / "nlu.md"
    md.write_text(
        "# Natural language understanding\n\nA note with `code`.\n\n"
        "| method | acc |\n|---|---|\n| lora | 91.00 ± 1.41 |\n"
    )
    out = report_pages.write_page(md)
    page = out.read_text()
    assert out == tmp_path / "nlu.html"
    assert "<title>Natural language understanding</title>" in page
    assert "<th>method</th>" in page and "<td>91.00 ± 1.41</td>" in page and "<code>code</code>" in page
    assert "<script" not in page and "http" not in page.split("</style>")[0].split("<style>")[1]


def test_raw_html_in_the_markdown_is_escaped(tmp_path):
    md = tmp_path / "claims.md"
    md.write_text("# Claims\n\n| id | claim |\n|---|---|\n| x | <script>alert(1)</script> |\n")
    page = report_pages.write_page(md).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_the_same_markdown_gives_the_same_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "t.md").write_text("# T\n\n| a |\n|---|\n| 1 |\n")
    pages = [report_pages.write_page(tmp_path / d / "t.md").read_bytes() for d in ("a", "b")]
    assert pages[0] == pages[1]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.md", None, "no such file"),
        ("empty.md", "  \n", "empty"),
        ("table.csv", "a,b\n", "not a Markdown"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert report_pages.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and name in err and message in err
    assert not path.with_suffix(".html").exists()
