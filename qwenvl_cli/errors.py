"""Typed errors. Each carries the exit code the CLI returns and a one-line message naming the file and
the numbers; the CLI prints `qwenvl: <message>` on stderr (a traceback only with QWENVL_DEBUG=1)."""

from __future__ import annotations


class QwenVLError(Exception):
    """Base class: a user-facing failure with an exit code."""

    exit_code = 1


class UsageError(QwenVLError):
    """Bad option values or combinations (exit 2, like a usage error)."""

    exit_code = 2


class InputError(QwenVLError):
    """An input file is missing, unreadable, or not what it claims to be."""


class ModelError(QwenVLError):
    """A model directory or hub id cannot be resolved or loaded (missing files, bad config, bad keys)."""


class ConfigError(ModelError):
    """config.json / generation_config.json / preprocessor_config.json holds impossible values."""


class PromptError(QwenVLError):
    """The prompt cannot be built or does not fit (vision token count mismatch, context overflow)."""


class AnswerError(QwenVLError):
    """The model's answer cannot be read as the task needs (no JSON, cut off before anything complete)."""


class OutputError(QwenVLError):
    """A result file (--output-dir, --draw, --sheet) cannot be written: an error of that input only."""


class StdoutError(QwenVLError):
    """Standard output is closed or cannot take the answers (a full disk): the run stops."""
