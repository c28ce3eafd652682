"""HTML tables from the model's document parsing ("QwenVL HTML") to CSV, Markdown, JSON and clean HTML.

The model's HTML is often untidy: missing </td> and </tr>, ```html fences, `data-bbox` attributes, and
output cut off at the token limit. Rules: the row open when the text ends is dropped (complete rows
are kept); colspan/rowspan are expanded by repeating the cell's text in every grid slot it covers (so
each CSV row stands alone); short rows are padded with ""; cell text has <br> and inner blocks as
spaces, entities decoded, whitespace collapsed. A table nested in a cell becomes text of that cell.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from html import escape
from html.parser import HTMLParser

MAX_SPAN = 1000  # colspan/rowspan beyond this are model noise, not tables
_BLOCKS = frozenset(
    "address article aside blockquote body caption dd div dl dt figcaption figure footer form h1 h2 h3 h4 "
    "h5 h6 header hr html li main nav ol p pre section table tbody tfoot thead title tr ul".split()
)


@dataclass(frozen=True)
class Table:
    """A rectangular grid of cell texts; the first `header_rows` rows are headers (from <thead>, or
    leading rows made only of <th>)."""

    rows: tuple[tuple[str, ...], ...]
    header_rows: int = 0

    def __post_init__(self) -> None:
        widths = {len(r) for r in self.rows}
        if len(widths) > 1:
            raise ValueError(f"table rows must all have the same length, got lengths {sorted(widths)}")
        if not 0 <= self.header_rows <= len(self.rows):
            raise ValueError(f"header_rows must be within 0..{len(self.rows)} (the row count), got {self.header_rows}")

    @property
    def width(self) -> int:
        return len(self.rows[0]) if self.rows else 0


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _span(attrs: dict[str, str | None], name: str) -> int:
    """colspan/rowspan as an int in [0, MAX_SPAN]: 0 (rowspan: to the end) kept, junk -> 1."""
    try:
        n = int(str(attrs.get(name) or "1").strip())
    except ValueError:
        return 1
    return n if 0 <= n <= MAX_SPAN else (MAX_SPAN if n > MAX_SPAN else 1)


@dataclass
class _Cell:
    parts: list[str] = field(default_factory=list)
    colspan: int = 1
    rowspan: int = 1
    header: bool = False


@dataclass
class _Row:
    cells: list[_Cell] = field(default_factory=list)
    in_thead: bool = False


@dataclass
class _RawTable:
    rows: list[_Row] = field(default_factory=list)
    row: _Row | None = None  # open row
    cell: _Cell | None = None  # open cell
    in_thead: bool = False
    nested: int = 0  # depth of tables inside the open cell


class _TableParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[Table] = []
        self.t: _RawTable | None = None

    # -- structure
    def _close_cell(self) -> None:
        if self.t is not None and self.t.cell is not None:
            self.t.cell = None

    def _close_row(self) -> None:
        t = self.t
        if t is not None and t.row is not None:
            self._close_cell()
            if t.row.cells:
                t.rows.append(t.row)
            t.row = None

    def _finish(self) -> None:
        """Close the open table at </table> or a new <table>: its open row counts as complete."""
        if self.t is not None:
            self._close_row()
            if table := _build(self.t.rows):
                self.tables.append(table)
            self.t = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        t = self.t
        if t is not None and t.cell is not None and (t.nested or tag == "table"):
            t.nested += tag == "table"
            t.cell.parts.append(" ")  # a table inside a cell: its text joins the cell's
            return
        if tag == "table":
            self._finish()
            self.t = _RawTable()
        elif t is None:
            return
        elif tag in ("thead", "tbody", "tfoot"):
            self._close_row()
            t.in_thead = tag == "thead"
        elif tag == "tr":
            self._close_row()
            t.row = _Row(in_thead=t.in_thead)
        elif tag in ("td", "th"):
            self._close_cell()
            if t.row is None:
                t.row = _Row(in_thead=t.in_thead)
            a = dict(attrs)
            t.cell = _Cell(colspan=max(1, _span(a, "colspan")), rowspan=_span(a, "rowspan"), header=tag == "th")
            t.row.cells.append(t.cell)
        elif t.cell is not None and (tag == "br" or tag in _BLOCKS):
            t.cell.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)  # <br/>, <td/>: no separate end

    def handle_endtag(self, tag: str) -> None:
        t = self.t
        if t is None:
            return
        if t.nested:
            t.nested -= tag == "table"
            if t.cell is not None:
                t.cell.parts.append(" ")
        elif tag == "table":
            self._finish()
        elif tag in ("td", "th"):
            self._close_cell()
        elif tag == "tr":
            self._close_row()
        elif tag in ("thead", "tbody", "tfoot"):
            self._close_row()
            t.in_thead = False
        elif t.cell is not None and tag in _BLOCKS:
            t.cell.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self.t is not None and self.t.cell is not None:
            self.t.cell.parts.append(data)

    def close(self) -> None:
        super().close()
        if self.t is not None:  # cut off inside a table: drop the open row, keep the complete ones
            self.t.row = self.t.cell = None
            self._finish()


def _build(raw_rows: list[_Row]) -> Table | None:
    """Expand spans into a rectangular grid; None for a table without cells."""
    if not raw_rows:
        return None
    n = len(raw_rows)
    grid: list[dict[int, str]] = [{} for _ in range(n)]
    for r, row in enumerate(raw_rows):
        c = 0
        for cell in row.cells:
            while c in grid[r]:  # slots taken by rowspans from above
                c += 1
            text = _collapse("".join(cell.parts))
            down = n - r if cell.rowspan == 0 else min(cell.rowspan, n - r)
            for rr in range(r, r + down):
                for cc in range(c, c + cell.colspan):
                    grid[rr].setdefault(cc, text)
            c += cell.colspan
    width = max((max(g) + 1 for g in grid if g), default=0)
    rows = tuple(tuple(g.get(c, "") for c in range(width)) for g in grid)
    header_rows = 0
    for row in raw_rows:
        if not (row.in_thead or all(cell.header for cell in row.cells)):
            break
        header_rows += 1
    return Table(rows=rows, header_rows=header_rows)


def tables_from_html(html: str) -> list[Table]:
    """Every top-level <table> in the model's answer, in order (fences and prose around them ignored)."""
    parser = _TableParser()
    parser.feed(html)
    parser.close()
    return parser.tables


# ---- renderings


def header_names(table: Table) -> list[str]:
    """One name per column: the column's header texts top to bottom, repeats (from colspans) removed,
    joined with a space. With no header rows, the first row's texts."""
    head = table.rows[: table.header_rows] if table.header_rows else table.rows[:1]
    names = []
    for c in range(table.width):
        parts: list[str] = []
        for row in head:
            if row[c] and (not parts or parts[-1] != row[c]):
                parts.append(row[c])
        names.append(" ".join(parts))
    return names


def _unique(names: list[str]) -> list[str]:
    """Empty names -> "col_N" (N from 1, by position); repeats -> "name_2", "name_3", ..."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        base = name or f"col_{i + 1}"
        key, k = base, 1
        while key in seen:
            k += 1
            key = f"{base}_{k}"
        seen.add(key)
        out.append(key)
    return out


def _body(table: Table) -> tuple[tuple[str, ...], ...]:
    return table.rows[table.header_rows :] if table.header_rows else table.rows[1:]


def to_csv(table: Table) -> str:
    """All rows (headers included) as CSV: RFC 4180 quoting, "\\n" after every line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(table.rows)
    return out.getvalue()


def to_markdown(table: Table) -> str:
    """A GitHub pipe table, "\\n" after every line. Markdown has one header row: several header rows are
    merged per column (header_names); with none, the first row is the header."""
    if not table.rows:
        return ""

    def line(cells) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(header_names(table)), "|" + "|".join(" --- " for _ in range(table.width)) + "|"]
    lines += [line(row) for row in _body(table)]
    return "\n".join(lines) + "\n"


def to_json(table: Table) -> list:
    """With header rows: a dict per body row keyed by the header names (made unique: "", "total",
    "total" -> "col_1", "total", "total_2"). Without: a list of lists of every row."""
    if not table.header_rows:
        return [list(row) for row in table.rows]
    keys = _unique(header_names(table))
    return [dict(zip(keys, row)) for row in table.rows[table.header_rows :]]


def to_html(table: Table) -> str:
    """A minimal <table>: header rows in <thead> as <th>, the rest in <tbody>; spans stay expanded."""

    def rows(rs, tag: str) -> list[str]:
        return ["<tr>" + "".join(f"<{tag}>{escape(c, quote=False)}</{tag}>" for c in r) + "</tr>" for r in rs]

    parts = ["<table>"]
    if table.header_rows:
        parts += ["<thead>", *rows(table.rows[: table.header_rows], "th"), "</thead>"]
    parts += ["<tbody>", *rows(table.rows[table.header_rows :], "td"), "</tbody>", "</table>"]
    return "\n".join(parts) + "\n"


__all__ = [
    "Table",
    "header_names",
    "tables_from_html",
    "to_csv",
    "to_html",
    "to_json",
    "to_markdown",
]
