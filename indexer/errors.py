"""The root of the indexer layer's errors (the user-error branch is model.errors.UserError, shared by all)."""

from __future__ import annotations

from model.errors import UserError


class IndexerError(Exception):
    """Every error the indexer layer raises on purpose derives from this."""


__all__ = ["IndexerError", "UserError"]
