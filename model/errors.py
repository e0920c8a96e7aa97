"""The root of the model layer's errors, and the "user error" branch every layer shares.

A `UserError` is a problem a person can fix (a bad flag, a missing file, an unknown preset, a refused URL),
not a bug: the `indexer` CLI prints its message and exits with `exit_code`, and the service answers with
its `code`, whose HTTP status app/errors.py's table gives. Both map by this class, never by a list.
"""

from __future__ import annotations


class UserError(Exception):
    """Input or setup that cannot be used, said so that a person can act on it."""

    exit_code = 2
    code = "invalid_input"


class ModelError(Exception):
    """Every error the model layer raises on purpose derives from this."""
