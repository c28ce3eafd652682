"""`qwenvl extract`: OCR text, text lines with boxes, key fields or a JSON Schema, and tables."""

from __future__ import annotations

import json as jsonlib
from enum import Enum
from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import Session, common_options, make_constraint_factory, reported_errors, shared_options


class Format(str, Enum):
    text = "text"
    markdown = "markdown"
    csv = "csv"
    json = "json"
    html = "html"


TABLE_SUFFIX = {"csv": ".csv", "markdown": ".md", "json": ".json", "html": ".html"}


def choose_mode(fields: str | None, schema: str | None, fmt: str, json_out: bool, together: bool):
    """The options -> an ExtractMode, or a UsageError naming the clash."""
    from qwenvl_cli.errors import UsageError
    from qwenvl_cli.tasks.extract import ExtractMode, load_schema, parse_fields

    if fields is not None and schema is not None:
        raise UsageError("--fields and --schema both say what to extract: give one")
    if (fields is not None or schema is not None) and fmt != "text":
        raise UsageError(f"--format {fmt} is for tables; --fields and --schema already give JSON")
    if fields is not None:
        return ExtractMode("fields", fields=parse_fields(fields))
    if schema is not None:
        return ExtractMode("schema", schema=load_schema(schema))
    if fmt != "text":
        return ExtractMode("tables", table_format=fmt)
    if json_out:
        if together:
            raise UsageError("--json reads text lines with their boxes, one picture at a time: drop --together")
        return ExtractMode("lines")
    return ExtractMode("text")


def render_tables(tables, fmt: str) -> list:
    from qwenvl_cli.tables import to_csv, to_html, to_json, to_markdown

    render = {"csv": to_csv, "markdown": to_markdown, "json": to_json, "html": to_html}[fmt]
    return [render(t) for t in tables]


@app.command(
    epilog=(
        "Examples:\n\n"
        "  qwenvl extract scan.png                      # the text, in reading order\n\n"
        "  qwenvl extract invoice.pdf --fields 'invoice number,date,total'\n\n"
        "  qwenvl extract form.pdf --schema form.schema.json --json\n\n"
        "  qwenvl extract report.pdf --pages 4 --format csv -o tables/\n\n"
        "  qwenvl extract receipt.jpg --json | jq -r '.lines[].text'"
    )
)
@shared_options(exclude=("json",))
def extract(
    inputs: list[str] = typer.Argument(
        ..., metavar="IMAGE_OR_PDF...", help="Image or PDF files, globs, directories (-r), or - to read paths (or one file) from stdin."
    ),
    fields: Optional[str] = typer.Option(None, "--fields", help="Key fields to read, comma-separated: JSON with one value (or null) per field."),
    schema: Optional[str] = typer.Option(None, "--schema", help="A JSON Schema file: the output is JSON valid against it."),
    fmt: Format = typer.Option(Format.text, "--format", "-f", help="text: OCR; csv/markdown/json/html: the tables."),
    json: bool = typer.Option(False, "--json", help="One JSON object per answer, one per line (plain OCR becomes text lines with boxes)."),
    together: bool = typer.Option(False, "--together", help="All images and pages in one prompt, one answer."),
    **shared,
) -> None:
    """Read documents: the text (OCR), key fields or a JSON Schema as valid JSON, or the tables as CSV,
    Markdown, JSON or HTML. One answer per image or PDF page."""
    with reported_errors():
        from qwenvl_cli.errors import UsageError
        from qwenvl_cli.output import warn
        from qwenvl_cli.tasks.extract import extract_plan, lines_record

        mode = choose_mode(fields, schema, fmt.value, json, together)
        session = Session(common_options({**shared, "json": json, "together": together}, inputs), streams_text=mode.kind == "text")
        make = make_constraint_factory(session.engine)
        if mode.kind == "schema":
            try:
                make(mode.schema)  # an unsupported schema fails here, before any input is read
            except UsageError as exc:
                raise UsageError(f"--schema {schema}: {exc}") from None
        for outcome in session.run(extract_plan(mode, make)):
            got = outcome.result
            record = session.base_record(outcome)
            text = None  # streamed already
            suffix = None
            if mode.kind == "text":
                record["text"] = got.text
            elif mode.kind == "lines":
                record.update(lines_record(got))
                if got.lines.truncated:
                    warn(f"{outcome.label}: the answer hit --max-new-tokens; showing the complete lines")
            elif mode.kind in ("fields", "schema"):
                record["data"] = got.data
                text, suffix = jsonlib.dumps(got.data, ensure_ascii=False, indent=2), ".json"
            else:
                tables = render_tables(got.tables, mode.table_format)
                record["format"] = mode.table_format
                record["tables"] = tables
                if not tables:
                    warn(f"{outcome.label}: no tables found")
                if mode.table_format == "json":
                    text = jsonlib.dumps(tables, ensure_ascii=False, indent=2)
                else:
                    text = "\n\n".join(t.rstrip("\n") for t in tables)
                suffix = TABLE_SUFFIX[mode.table_format]
                if session.writer is not None and not json and mode.table_format == "csv":
                    session.writer.write_each(outcome.names[0], outcome.page, tables, "table", ".csv")
                    continue
            record.update(session.usage(outcome))
            session.emit(outcome, record, text, suffix)
        session.close()
