"""The service's version: the installed package's own (pyproject.toml is the one place it is written)."""

from __future__ import annotations

from importlib import metadata

DIST_NAME = "tokenbinder-search"


def package_version() -> str:
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"
