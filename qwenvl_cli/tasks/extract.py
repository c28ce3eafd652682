"""`qwenvl extract`: what a document says, in the form asked for.

- text (default): OCR in reading order, free text, streamed.
- lines (--json): text spotting, `[{"bbox_2d", "text_content"}]` constrained, boxes mapped to the original.
- fields / schema: key information as JSON constrained to the schema (fields: every value a string or null).
- tables (--format csv|markdown|json|html): the page read as QwenVL HTML, its tables converted.
Prompts are the cookbooks' (see ../shared/QWEN25VL.md).
"""

from __future__ import annotations

import json
import os
import select
import stat
from dataclasses import dataclass
from typing import Any, Sequence

from qwenvl_cli.constrain import SCHEMA_MAX_DEPTH, bound_schema, check_depth
from qwenvl_cli.engine import Answer
from qwenvl_cli.errors import AnswerError, UsageError
from qwenvl_cli.inputs import PIPE_WAIT_SECONDS, read_bounded
from qwenvl_cli.jsonfix import LenientJSONError, parse_lenient
from qwenvl_cli.tables import Table, tables_from_html
from qwenvl_cli.tasks.base import Rendered, Task
from qwenvl_cli.tasks.ground import coords_schema, found_record, read_detections
from qwenvl_cli.tasks.runner import Job, Outcome, Seen

OCR_PROMPT = "Read all the text in the image."
SPOTTING_PROMPT = "Spotting all the text in the image with line-level, and output in JSON format."
HTML_PROMPT = "QwenVL HTML"
TABLE_FORMATS = ("csv", "markdown", "json", "html")
TABLE_SUFFIX = {"csv": ".csv", "markdown": ".md", "json": ".json", "html": ".html"}


def spotting_schema(size: tuple[int, int]) -> dict:
    """Text spotting: `[{"bbox_2d", "text_content"}]`, boxes within the resized picture."""
    item = {
        "type": "object",
        "properties": {"bbox_2d": coords_schema(4, size), "text_content": {"type": "string"}},
        "required": ["bbox_2d", "text_content"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": item}


@dataclass(frozen=True)
class ExtractMode:
    kind: str  # "text" | "lines" | "fields" | "schema" | "tables"
    fields: tuple[str, ...] = ()
    schema: dict | None = None
    schema_path: str | None = None  # where --schema came from, for messages
    table_format: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("text", "lines", "fields", "schema", "tables"):
            raise ValueError(f"unknown extract mode {self.kind!r}")


def parse_fields(spec: str) -> tuple[str, ...]:
    """`"invoice number, date,total"` -> ("invoice number", "date", "total"), duplicates dropped."""
    fields = tuple(dict.fromkeys(f.strip() for f in spec.split(",") if f.strip()))
    if not fields:
        raise UsageError(f"--fields {spec!r}: give field names separated by commas, e.g. 'invoice number,date,total'")
    return fields


def choose_mode(fields: str | None, schema: str | None, fmt: str, json_out: bool, together: bool) -> ExtractMode:
    """The options -> an ExtractMode, or a UsageError naming the clash."""
    if fields is not None and schema is not None:
        raise UsageError("--fields and --schema both say what to extract: give one")
    if (fields is not None or schema is not None) and fmt != "text":
        raise UsageError(f"--format {fmt} is for tables; --fields and --schema already give JSON")
    if fields is not None:
        return ExtractMode("fields", fields=parse_fields(fields))
    if schema is not None:
        return ExtractMode("schema", schema=load_schema(schema), schema_path=schema)
    if fmt != "text":
        return ExtractMode("tables", table_format=fmt)
    if json_out:
        if together:
            raise UsageError("--json reads text lines with their boxes, one picture at a time: drop --together")
        return ExtractMode("lines")
    return ExtractMode("text")


SCHEMA_MAX_BYTES = 1 << 20  # a JSON Schema is a few KiB; /dev/zero or a log file must not fill the memory


def load_schema(path: str) -> dict:
    """The --schema file as a dict; every problem (missing, too big, a pipe nobody writes to, not JSON,
    nested too deeply) is a one-line UsageError naming the path."""
    text = _read_schema(path)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--schema {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise UsageError(f"--schema {path}: nested too deeply (at most {SCHEMA_MAX_DEPTH} levels)") from exc
    if not isinstance(schema, dict):
        raise UsageError(f"--schema {path}: a JSON Schema is an object, got {type(schema).__name__}")
    try:
        check_depth(schema)
    except UsageError as exc:
        raise UsageError(f"--schema {path}: {exc}") from exc
    return schema


def _read_schema(path: str) -> str:
    """At most SCHEMA_MAX_BYTES of the file; a FIFO or device waits at most PIPE_WAIT_SECONDS for data,
    as inputs do (inputs._read_pipe, whose 1 GiB bound is for images), through the same bounded reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: opening a FIFO waits for no writer
    except FileNotFoundError as exc:
        raise UsageError(f"--schema {path}: file not found") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"--schema {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"--schema {path}: is a directory")
        if stat.S_ISREG(info.st_mode):
            if info.st_size > SCHEMA_MAX_BYTES:
                raise UsageError(f"--schema {path}: {info.st_size} bytes; a schema must be at most "
                                 f"{SCHEMA_MAX_BYTES} bytes ({SCHEMA_MAX_BYTES >> 20} MiB)")
        elif not select.select([fd], [], [], PIPE_WAIT_SECONDS)[0]:
            raise UsageError(f"--schema {path}: not a regular file, and nothing was written to it in "
                             f"{PIPE_WAIT_SECONDS:g} s")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as stream:
            data = read_bounded(stream, SCHEMA_MAX_BYTES)
        if data is None:
            raise UsageError(f"--schema {path}: more than {SCHEMA_MAX_BYTES} bytes "
                             f"({SCHEMA_MAX_BYTES >> 20} MiB); a schema must be at most that")
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--schema {path}: cannot read ({exc})") from exc
    except OSError as exc:
        raise UsageError(f"--schema {path}: cannot read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)


FIELD_MAX_CHARS = 200  # key fields are short values; the bound also guarantees the answer ends


def fields_schema(fields: Sequence[str]) -> dict:
    """Every field present, in order, each a string of at most FIELD_MAX_CHARS or null. (--schema for
    anything longer or typed.)"""
    value = {"anyOf": [{"type": "string", "maxLength": FIELD_MAX_CHARS}, {"type": "null"}]}
    return {
        "type": "object",
        "properties": {f: value for f in fields},
        "required": list(fields),
        "additionalProperties": False,
    }


def fields_prompt(fields: Sequence[str]) -> str:
    template = json.dumps({f: "" for f in fields}, ensure_ascii=False)
    return f"Extract the key-value information in the format:{template}"


def schema_prompt(schema: dict) -> str:
    return (
        "Extract the information in this document as JSON that follows this JSON Schema; "
        "use null for values the document does not show.\n" + json.dumps(schema, ensure_ascii=False)
    )


@dataclass(frozen=True)
class Extracted:
    text: str | None = None
    data: Any = None
    tables: tuple[Table, ...] | None = None
    lines: Any = None  # the spotting result (a ground.Found) in --json mode


def _data(answer: Answer) -> Any:
    if answer.finish_reason == "length":
        raise AnswerError(
            f"the answer was cut off at {answer.completion_tokens} tokens before the JSON was complete "
            "(raise --max-new-tokens)"
        )
    try:
        return parse_lenient(answer.text)
    except LenientJSONError as exc:
        raise AnswerError(f"the model's answer is not JSON: {answer.text[:80]!r}") from exc


def _spotting(answer: Answer, seen: Sequence[Seen]) -> Extracted:
    if len(seen) != 1:
        raise UsageError("--json reads text lines with their boxes, one picture at a time: drop --together")
    found = read_detections(answer, seen[0])
    return Extracted(text="\n".join(d.label for d in found.detections), lines=found)


def lines_record(got: Extracted) -> dict:
    """The --json fields of text spotting: `text` (the lines joined), `lines` as `{"text", "bbox_2d"
    [, "bbox_pdf"]}` in original pixels, `image_size` (and `dpi` on PDF pages)."""
    found = found_record(got.lines, points=False)
    lines = [{"text": obj.pop("label"), **obj} for obj in found.pop("objects")]
    return {"text": got.text, "lines": lines, **found}


def render_tables(tables, fmt: str) -> list:
    from qwenvl_cli.tables import to_csv, to_html, to_json, to_markdown

    render = {"csv": to_csv, "markdown": to_markdown, "json": to_json, "html": to_html}[fmt]
    return [render(t) for t in tables]


class ExtractTask(Task):
    """`json_out`: the records are JSON (plain OCR becomes text spotting, CSV tables stay one record)."""

    def __init__(self, mode: ExtractMode, json_out: bool) -> None:
        self.mode = mode
        self.json_out = json_out
        self.streams = mode.kind == "text"

    def prepare(self, engine, items) -> None:
        super().prepare(engine, items)
        if self.mode.kind == "schema":
            try:
                # Decoded against the schema with bounds on every open-ended value (the prompt shows the
                # user's own), so that a looping model still closes the JSON; see constrain.bound_schema.
                self._bounded = bound_schema(self.mode.schema)
                self._constraint(self._bounded)  # an unsupported schema fails here, before any input is read
            except UsageError as exc:
                raise UsageError(f"--schema {self.mode.schema_path}: {exc}") from exc

    def _constraint(self, schema: dict):
        return self.engine.json_constraint(schema, fenced=True)

    def plan(self, seen: Sequence[Seen]) -> Job:
        mode = self.mode
        if mode.kind == "text":
            return Job(OCR_PROMPT, finish=lambda a: Extracted(text=a.text))
        if mode.kind == "lines":
            size = seen[0].image.resized_size
            return Job(SPOTTING_PROMPT, lambda a: _spotting(a, seen), self._constraint(spotting_schema(size)))
        if mode.kind == "fields":
            schema = fields_schema(mode.fields)
            return Job(fields_prompt(mode.fields), lambda a: Extracted(data=_data(a)), self._constraint(schema))
        if mode.kind == "schema":
            return Job(schema_prompt(mode.schema), lambda a: Extracted(data=_data(a)), self._constraint(self._bounded))
        return Job(HTML_PROMPT, finish=lambda a: Extracted(text=a.text, tables=tuple(tables_from_html(a.text))))

    def render(self, outcome: Outcome) -> Rendered:
        got, kind = outcome.result, self.mode.kind
        if kind == "text":
            return Rendered({"text": got.text})
        if kind == "lines":
            notes = ()
            if got.lines.truncated:
                notes = (f"{outcome.label}: the answer hit --max-new-tokens; showing the complete lines",)
            return Rendered(lines_record(got), notes=notes)
        if kind in ("fields", "schema"):
            return Rendered({"data": got.data}, json.dumps(got.data, ensure_ascii=False, indent=2), ".json")
        fmt = self.mode.table_format
        tables = render_tables(got.tables, fmt)
        notes = () if tables else (f"{outcome.label}: no tables found",)
        if fmt == "json":
            text = json.dumps(tables, ensure_ascii=False, indent=2)
        else:
            text = "\n\n".join(t.rstrip("\n") for t in tables)
        files = ("table", ".csv", tuple(tables)) if fmt == "csv" and not self.json_out else None
        return Rendered({"format": fmt, "tables": tables}, text, TABLE_SUFFIX[fmt], files, notes)
