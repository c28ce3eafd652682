"""`qwenvl extract`: OCR text, text lines with boxes, key fields or a JSON Schema, and tables."""

from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from qwenvl_cli.cli import app
from qwenvl_cli.cli.common import common_options, reported_errors, shared_options


class Format(str, Enum):
    text = "text"
    markdown = "markdown"
    csv = "csv"
    json = "json"
    html = "html"


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
        from qwenvl_cli.cli.run import run_task
        from qwenvl_cli.tasks.extract import ExtractTask, choose_mode

        task = ExtractTask(choose_mode(fields, schema, fmt.value, json, together), json)
        run_task(task, common_options({**shared, "json": json, "together": together}, inputs))
