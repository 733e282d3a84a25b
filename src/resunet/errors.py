"""Errors a user can cause.

Every error raised for bad input, bad configuration or a bad file is a `ResunetError` (or a
subclass) whose message names the file or setting and says how to fix it. The CLI prints the
message (no traceback) and exits with code 2.
"""

from __future__ import annotations


class ResunetError(Exception):
    """A problem the user can fix: bad input file, bad argument, bad configuration."""


class InputError(ResunetError):
    """An input file or folder cannot be read or does not fit what is expected."""


class ConfigError(ResunetError):
    """A configuration value is unknown, of the wrong type or inconsistent."""


class ModelError(ResunetError):
    """A model name, shape or checkpoint does not fit."""
