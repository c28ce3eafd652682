"""The `qwenvl` command: options -> request -> run -> output, one module per subcommand.

Errors become one `qwenvl: ...` line on stderr and an exit code (QWENVL_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import typer

from qwenvl_cli import __version__

app = typer.Typer(
    name="qwenvl",
    help="Understand images, PDFs and videos with Qwen2.5-VL, locally, from the shell.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qwenvl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Understand images, PDFs and videos with Qwen2.5-VL, locally, from the shell."""


# Each module registers its command on `app`.
from qwenvl_cli.cli import describe, extract, ground, manage, video  # noqa: E402,F401


def main() -> None:
    import os
    import sys

    if sys.stderr is None:  # started with 2>&- : run all the same, with nowhere to say anything
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    if sys.stdout is None:  # started with >&- : answers would go nowhere
        sys.stderr.write("qwenvl: standard output is closed: there is nowhere to write the answers\n")
        raise SystemExit(1)
    app()


if __name__ == "__main__":
    main()
