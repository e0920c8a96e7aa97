"""The `indexer` command line: thin subcommands over the indexer's library functions.

`env` (what a command gets), `commands` (the subcommands), `parser` (flags and help); `main` here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from indexer.cli.env import Env, UsageError
from indexer.cli.parser import build_parser
from indexer.errors import UserError
from indexer.log_setup import configure_logging
from indexer.paths import DataDir
from indexer.settings import SharedSettings

logger = logging.getLogger(__name__)

# Commands that run as a service log at TVS_LOG_LEVEL; the others print their result and log only warnings,
# unless TVS_LOG_LEVEL is set or -v is given.
_SERVICE_COMMANDS = {"worker"}
# Settings a command's flag overrides: setting name -> argparse dest (absent from commands without the flag).
_FLAGS = {
    "data_dir": "data_dir",
    "database_url": "database_url",
    "model": "model",
    "vector_backend": "backend",
    "milvus_uri": "milvus_uri",
    "index_device": "index_device",
    "index_nprobe": "index_nprobe",
    "index_ef_search": "index_ef_search",
    "index_rerank": "index_rerank",
    "feed_retention_s": "retention_s",
}


def load_settings(args: argparse.Namespace) -> SharedSettings:
    """TVS_* and .env, with the command's flags on top; UsageError naming each bad value."""
    given = {
        setting: getattr(args, flag)
        for setting, flag in _FLAGS.items()
        if getattr(args, flag, None) is not None
    }
    try:
        return SharedSettings(**given)
    except ValidationError as e:
        problems = "; ".join(_readable(err, given) for err in e.errors())
        raise UsageError(f"invalid settings: {problems}") from e


def _readable(error: Any, flags: dict[str, Any]) -> str:
    """`--flag=value: why` for a value given as a flag, `TVS_NAME=value: why` for one from the environment."""
    setting = "_".join(map(str, error["loc"]))
    name = f"--{_FLAGS[setting].replace('_', '-')}" if setting in flags else f"TVS_{setting.upper()}"
    return f"{name}={error.get('input')!r}: {str(error['msg']).removeprefix('Value error, ')}"


def _log_level(args: argparse.Namespace, settings: SharedSettings) -> str:
    if "log_level" in settings.model_fields_set or args.command in _SERVICE_COMMANDS:
        return settings.log_level
    return "INFO" if args.verbose else "WARNING"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except UsageError as e:
        print(f"indexer {args.command}: {e}", file=sys.stderr)
        return 2
    configure_logging(_log_level(args, settings), settings.log_format)
    data = DataDir(settings.data_dir)
    env = Env(args, settings, data, settings.database_url or data.database_url)
    try:
        data.ensure()
        return int(args.fn(env))
    except UserError as e:  # any layer's: a problem the user can fix, shown as its message, not a traceback
        print(f"indexer {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:  # the OS's own user error: a path given on the command line
        print(f"indexer {args.command}: {e}", file=sys.stderr)
        return 2


__all__ = ["Env", "UsageError", "build_parser", "main"]
