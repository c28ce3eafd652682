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


def started_up() -> None:
    """The imports are done: cyclic garbage collection back on if run_cli() turned it off, with every object
    alive now frozen out of it (modules, functions, classes: they live to the end of the process, and the
    first full collection over them would cost 0.13 s; the few thousand objects of garbage cycles left by
    the imports stay too)."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


# Each module registers its command on `app`.
from qwenvl_cli.cli import describe, extract, ground, manage, video  # noqa: E402,F401


def run_cli() -> None:
    """The command line in sys.argv, run; ends in SystemExit as any Typer app does."""
    import gc
    import os
    import sys

    # Start-up allocates ~190k objects that live as long as the process (torch's import alone 165k), and
    # the cyclic collector walked them in ~430 collections on the way: 0.2 s of a 2.2 s start-up, measured.
    # It is off until the imports are done (started_up).
    gc.disable()
    if sys.stderr is None:  # started with 2>&- : run all the same, with nowhere to say anything
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    if sys.stdout is None:  # started with >&- : answers would go nowhere
        sys.stderr.write("qwenvl: standard output is closed: there is nowhere to write the answers\n")
        raise SystemExit(1)
    app()


def main() -> None:
    """The `qwenvl` console script: run_cli(), then out of the process without the interpreter's teardown."""
    try:
        run_cli()
    except SystemExit as exc:
        _leave(exc)
        raise


def _leave(exc: SystemExit) -> None:
    """Exit now with `exc`'s status, skipping the interpreter's teardown: unloading torch's modules and C++
    state takes 0.08-0.1 s of every run that loaded a model (0.02 s this way, measured). What of that
    teardown matters here is done first: the atexit handlers (the PDF renderer's child process goes), and
    the standard streams flushed. Returns, for the ordinary exit, where it cannot tell that is all: another
    thread still running, a status that is not a number, a stream that will not flush."""
    import atexit
    import os
    import sys
    import threading

    code = 0 if exc.code is None else exc.code
    if not isinstance(code, int) or threading.active_count() > 1:
        return
    streams = [s for s in (sys.stdout, sys.stderr) if s is not None]  # None: started with >&-
    for stream in streams:
        try:
            stream.flush()
        except (OSError, ValueError):  # what Python's own exit would report (status 120): let it
            return
    atexit._run_exitfuncs()
    for stream in streams:
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
