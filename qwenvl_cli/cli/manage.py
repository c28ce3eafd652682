"""`qwenvl models` and `qwenvl download`: the local model cache."""

from __future__ import annotations

import typer

from qwenvl_cli.cli import app, started_up
from qwenvl_cli.cli.common import reported_errors


@app.command(epilog="Example:\n\n  qwenvl models")
def models() -> None:
    """List the known Qwen2.5-VL checkpoints and which are in the local cache, with their size."""
    with reported_errors():
        from qwenvl_cli.hub import KNOWN_MODELS, cached_models

        started_up()

        cached = cached_models()
        names = list(KNOWN_MODELS) + sorted(k for k in cached if k not in KNOWN_MODELS and "VL" in k)
        width = max(len(n) for n in names)
        for name in names:
            entry = cached.get(name)
            status = f"cached  {entry.size_bytes / 1e9:6.1f} GB  {entry.path}" if entry else "not downloaded"
            typer.echo(f"{name:<{width}}  {status}")


@app.command(epilog="Example:\n\n  qwenvl download Qwen/Qwen2.5-VL-7B-Instruct")
def download(
    model: str = typer.Argument(..., help="Hub id, e.g. Qwen/Qwen2.5-VL-3B-Instruct."),
) -> None:
    """Download a checkpoint into the Hugging Face cache (resumable; progress on stderr)."""
    with reported_errors():
        from qwenvl_cli.hub import download as fetch

        started_up()

        typer.echo(str(fetch(model)))
