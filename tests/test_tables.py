"""HTML tables as the model writes them, to grids and to CSV / Markdown / JSON / HTML; documents to text."""

from __future__ import annotations

import csv
import io

import pytest

from qwenvl_cli.tables import (
    Table,
    header_names,
    tables_from_html,
    to_csv,
    to_html,
    to_json,
    to_markdown,
)


def one(html: str) -> Table:
    tables = tables_from_html(html)
    assert len(tables) == 1, tables
    return tables[0]


def test_simple_table() -> None:
    t = one("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>")
    assert t == Table(rows=(("a", "b"), ("c", "d")), header_rows=0)


def test_thead_and_tbody() -> None:
    t = one(
        "<table><thead><tr><td>Name</td><td>Age</td></tr></thead>"
        "<tbody><tr><td>Ann</td><td>31</td></tr><tr><td>Bo</td><td>4</td></tr></tbody></table>"
    )
    assert t.rows == (("Name", "Age"), ("Ann", "31"), ("Bo", "4"))
    assert t.header_rows == 1


def test_th_rows_are_headers_but_row_headers_are_not() -> None:
    t = one(
        "<table><tr><th>Q</th><th>Total</th></tr><tr><th>Sub</th><th>x</th></tr>"
        "<tr><th>Jan</th><td>5</td></tr><tr><th>Feb</th><td>6</td></tr></table>"
    )
    assert t.header_rows == 2
    assert t.rows[2:] == (("Jan", "5"), ("Feb", "6"))


def test_colspan_and_rowspan_repeat_the_text() -> None:
    t = one(
        "<table>"
        "<tr><th rowspan='2'>Region</th><th colspan=\"2\">Sales</th></tr>"
        "<tr><th>2023</th><th>2024</th></tr>"
        "<tr><td>North</td><td>1</td><td>2</td></tr>"
        "<tr><td rowspan=2>South</td><td colspan=2>n/a</td></tr>"
        "<tr><td>3</td><td>4</td></tr>"
        "</table>"
    )
    assert t.rows == (
        ("Region", "Sales", "Sales"),
        ("Region", "2023", "2024"),
        ("North", "1", "2"),
        ("South", "n/a", "n/a"),
        ("South", "3", "4"),
    )
    assert t.header_rows == 2
    assert header_names(t) == ["Region", "Sales 2023", "Sales 2024"]


def test_spans_past_the_end_and_junk_spans() -> None:
    t = one("<table><tr><td rowspan=5>a</td><td colspan=x>b</td></tr><tr><td>c</td></tr></table>")
    assert t.rows == (("a", "b"), ("a", "c"))  # rowspan clipped to the table, bad colspan -> 1
    t = one("<table><tr><td rowspan=0>a</td><td>b</td></tr><tr><td>c</td></tr><tr><td>d</td></tr></table>")
    assert t.rows == (("a", "b"), ("a", "c"), ("a", "d"))  # rowspan=0: to the end


def test_short_rows_padded() -> None:
    t = one("<table><tr><td>a</td><td>b</td><td>c</td></tr><tr><td>d</td></tr></table>")
    assert t.rows == (("a", "b", "c"), ("d", "", ""))


def test_missing_closing_tags() -> None:
    t = one("<table><tr><td>a<td>b<tr><td>c<td>d</table>")
    assert t.rows == (("a", "b"), ("c", "d"))
    t = one("<table><thead><tr><th>h1<th>h2<tbody><tr><td>x<td>y</table>")
    assert t.rows == (("h1", "h2"), ("x", "y")) and t.header_rows == 1


@pytest.mark.parametrize(
    "cut",
    [
        "<tr><td>3</td><td>4",  # mid-row
        "<tr><td>3</td><td>4</td>",  # a row not yet closed
        "<tr><td>3</td><td",  # inside a tag
        "<tr><td>3 &am",  # inside an entity
        "<t",
        "",
    ],
)
def test_truncated_keeps_complete_rows(cut: str) -> None:
    text = "```html\n<table><tr><th>x</th><th>y</th></tr><tr><td>1</td><td>2</td></tr>" + cut
    t = one(text)
    assert t.rows == (("x", "y"), ("1", "2"))
    assert t.header_rows == 1


def test_truncated_before_any_row() -> None:
    assert tables_from_html("<table><tr><td>only a partial") == []
    assert tables_from_html("no tables here") == []
    assert tables_from_html("") == []


def test_two_tables_fenced_with_data_bbox() -> None:
    text = (
        "Here is the document:\n```html\n<html><body>\n"
        '<h1 data-bbox="10 10 200 40">Report</h1>\n'
        '<table data-bbox="10 50 300 120"><tr><td>a</td></tr></table>\n'
        '<p data-bbox="10 130 300 150">between</p>\n'
        '<table data-bbox="10 160 300 220"><tr><td>b</td><td>c</td></tr></table>\n'
        "</body></html>\n```"
    )
    assert tables_from_html(text) == [Table(rows=(("a",),)), Table(rows=(("b", "c"),))]


def test_entities_br_nested_tags_whitespace() -> None:
    t = one(
        "<table><tr><td> Fish &amp; <b>Chips</b> </td><td>a<br>b<br/>c</td>"
        "<td>&lt;5&gt; &#8364;3&nbsp;each</td><td><p>one</p><p>two</p></td><td>\n  spaced \t out </td></tr></table>"
    )
    assert t.rows == (("Fish & Chips", "a b c", "<5> \u20ac3 each", "one two", "spaced out"),)


def test_nested_table_is_cell_text() -> None:
    t = one("<table><tr><td>x<table><tr><td>in1</td><td>in2</td></tr></table></td><td>y</td></tr></table>")
    assert t.rows == (("x in1 in2", "y"),)


QUOTING = Table(rows=(("name", "note"), ("a|b", 'say "hi", then go'), ("", "plain")), header_rows=1)


def test_to_csv_quoting() -> None:
    text = to_csv(QUOTING)
    assert text == 'name,note\na|b,"say ""hi"", then go"\n,plain\n'
    assert list(csv.reader(io.StringIO(text))) == [list(r) for r in QUOTING.rows]


def test_to_markdown_escapes_pipes() -> None:
    assert to_markdown(QUOTING) == (
        '| name | note |\n| --- | --- |\n| a\\|b | say "hi", then go |\n|  | plain |\n'
    )


def test_to_markdown_first_row_as_header_without_headers() -> None:
    t = Table(rows=(("a", "b"), ("c", "d")))
    assert to_markdown(t) == "| a | b |\n| --- | --- |\n| c | d |\n"
    assert to_markdown(Table(rows=())) == ""


def test_to_markdown_merges_header_rows() -> None:
    t = Table(rows=(("Q1", "Q1"), ("Jan", "Feb"), ("1", "2")), header_rows=2)
    assert to_markdown(t) == "| Q1 Jan | Q1 Feb |\n| --- | --- |\n| 1 | 2 |\n"


def test_to_json_with_duplicate_and_empty_headers() -> None:
    t = Table(rows=(("item", "total", "", "total", "total_2"), ("a", "1", "x", "2", "3")), header_rows=1)
    assert to_json(t) == [{"item": "a", "total": "1", "col_3": "x", "total_2": "2", "total_2_2": "3"}]


def test_to_json_without_headers() -> None:
    assert to_json(Table(rows=(("a", "b"), ("c", "d")))) == [["a", "b"], ["c", "d"]]


def test_to_html_round_trip() -> None:
    t = Table(rows=(("h", "<x>"), ("a & b", "c")), header_rows=1)
    out = to_html(t)
    assert out == (
        "<table>\n<thead>\n<tr><th>h</th><th>&lt;x&gt;</th></tr>\n</thead>\n"
        "<tbody>\n<tr><td>a &amp; b</td><td>c</td></tr>\n</tbody>\n</table>\n"
    )
    assert one(out) == t
    assert "<thead>" not in to_html(Table(rows=(("a",),)))


def test_table_checks_shape() -> None:
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        Table(rows=(("a",), ("b", "c")))
    with pytest.raises(ValueError, match="header_rows"):
        Table(rows=(("a",),), header_rows=2)


