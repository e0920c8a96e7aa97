"""The `indexer` argument parser: every subcommand, its flags and their help."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.feed_compaction import DEFAULT_RETENTION_S
from indexer.schema import AUTO_MIGRATE_ENV

if TYPE_CHECKING:  # the pipeline pulls in torch and the decoders: loaded only by commands that index
    pass
from indexer.cli.commands import (
    cmd_add,
    cmd_compact,
    cmd_migrate,
    cmd_rebuild_index,
    cmd_reindex,
    cmd_rm,
    cmd_stats,
    cmd_verify,
    cmd_watch,
    cmd_worker,
)
from indexer.cli.env import Env

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=None, help="data directory (env TVS_DATA_DIR; default ./data)")
    common.add_argument(
        "--database-url",
        default=None,
        help="catalog URL (env TVS_DATABASE_URL; default sqlite:///<data-dir>/catalog.db)",
    )
    common.add_argument(
        "--model",
        default=None,
        help="preset, PRESET:PRETRAINED or checkpoint dir (env TVS_MODEL; default the demo model installed "
        "beside the code, assets/demo-model, else small)",
    )
    common.add_argument(
        "--backend",
        choices=["faiss", "milvus"],
        default=None,
        help="vector backend: faiss (snapshots in the data directory) or milvus (env TVS_VECTOR_BACKEND; "
        "default faiss); `rebuild-index --backend milvus` copies a FAISS library into Milvus",
    )
    common.add_argument(
        "--milvus-uri",
        default=None,
        help="Milvus: a .db file (Milvus Lite) or http://host:19530 (env TVS_MILVUS_URI; default "
        "<data-dir>/milvus.db); TVS_MILVUS_TOKEN, TVS_MILVUS_INDEX, TVS_MILVUS_PREFIX as for the service",
    )
    common.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    common.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details (level INFO unless TVS_LOG_LEVEL)"
    )
    pipe = argparse.ArgumentParser(add_help=False)
    pipe.add_argument("--batch-size", type=int, default=8, help="segments per encoder forward")
    pipe.add_argument("--decode-threads", type=int, default=1)
    pipe.add_argument(
        "--max-segment-s", type=float, default=30.0, help="videos up to this long are one segment"
    )
    pipe.add_argument("--window-s", type=float, default=15.0, help="window length for longer videos")

    parser = argparse.ArgumentParser(
        prog="indexer",
        description="Build and maintain the text-to-video index.",
        epilog="Settings shared with the service come from TVS_* variables and .env (TVS_ENV_FILE names "
        "another file): TVS_DATA_DIR, TVS_DATABASE_URL, TVS_MODEL, TVS_AUTO_MIGRATE, TVS_DEVICE, "
        "TVS_PRECISION, TVS_TORCH_THREADS, TVS_LOG_LEVEL, TVS_LOG_FORMAT (text|json), TVS_INDEX_DEVICE, "
        "TVS_INDEX_NPROBE, TVS_INDEX_EF_SEARCH, TVS_INDEX_RERANK, TVS_FEED_RETENTION_S, TVS_VECTOR_BACKEND, "
        "TVS_MILVUS_URI, TVS_MILVUS_TOKEN, TVS_MILVUS_INDEX, TVS_MILVUS_PREFIX, TVS_MILVUS_TIMEOUT_S. Flags win "
        "over them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[Env], int], text: str, parents: Sequence[argparse.ArgumentParser] = ()
    ) -> Any:
        p = sub.add_parser(name, help=text, description=text, parents=[common, *parents])
        p.set_defaults(fn=fn)
        return p

    p = add("migrate", cmd_migrate, "create or upgrade the catalog schema (alembic upgrade head)")
    p.description = (
        "Create or upgrade the catalog schema (alembic upgrade head). The other commands and the service "
        "do this themselves on an empty database, and on an older SQLite catalog (after a backup copy "
        f"beside it); an older PostgreSQL schema needs this command, or {AUTO_MIGRATE_ENV}=true."
    )
    p = add("add", cmd_add, "ingest and index video files, folders or globs (resumable)", [pipe])
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--mode",
        choices=["in-place", "copy", "move"],
        default="in-place",
        help="index files where they are (default), or copy/move them into the data directory",
    )
    p.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    p.add_argument("--max-attempts", type=int, default=3, help="tries per video before it is failed")
    p.add_argument(
        "--retry-failed", action="store_true", help="try again files that failed in an earlier run"
    )
    p = add("worker", cmd_worker, "run queued ingest jobs until stopped (SIGTERM/Ctrl-C)", [pipe])
    p.add_argument("--lease-s", type=float, default=60.0, help="job lease; renewed every third of it")
    p.add_argument("--poll-s", type=float, default=1.0, help="wait between empty queue checks")
    p = add(
        "watch",
        cmd_watch,
        "index videos as they appear or change in folders, remove deleted ones, until SIGTERM/Ctrl-C",
        [pipe],
    )
    p.add_argument("folders", nargs="+", type=Path, metavar="DIR")
    p.add_argument(
        "--settle-s",
        type=float,
        default=2.0,
        help="a new or changed file is indexed once its size and time have not changed for this long "
        "(a file still being copied is indexed once, when complete; default 2)",
    )
    p.add_argument(
        "--debounce-ms", type=int, default=500, help="group file-system events over this long (default 500)"
    )
    p = add("reindex", cmd_reindex, "index the library with --model; switch to it when complete", [pipe])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--missing", action="store_true", help="only videos without its segments (default)")
    which.add_argument("--all", action="store_true", help="every video, replacing its segments")
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (default); ray: decode and encode on a Ray cluster, write here",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster: auto, local, HOST:PORT or ray://HOST:10001 (default: RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument(
        "--encoders", type=int, default=None, help="Ray encoder actors (default: one per GPU, else one)"
    )
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument(
        "--index-device",
        type=_index_device,
        default=None,
        help="where to build the FAISS index: auto (a GPU when faiss has GPU support and sees one), cpu, "
        "cuda, cuda:N (env TVS_INDEX_DEVICE; default auto); the snapshot is saved from a CPU copy",
    )
    p = add(
        "rebuild-index",
        cmd_rebuild_index,
        "rebuild the FAISS snapshot (or, with --backend milvus, the Milvus collection) from the token store",
        [device],
    )
    p.add_argument(
        "--factory",
        "--index-factory",
        default=None,
        help="FAISS factory string, e.g. Flat, HNSW32, IVF1024,SQ8 (default: keep the current one, or Flat)",
    )
    p.add_argument(
        "--index-nprobe",
        type=int,
        default=None,
        help="IVF lists scanned per search, saved with the snapshot (env TVS_INDEX_NPROBE; default: the "
        "snapshot's when the factory stays, else 1); IVF factories only",
    )
    p.add_argument(
        "--index-ef-search",
        type=int,
        default=None,
        help="HNSW candidate pool, saved with the snapshot (env TVS_INDEX_EF_SEARCH; default: the snapshot's "
        "when the factory stays, else 16); HNSW factories only",
    )
    p.add_argument(
        "--index-rerank",
        type=int,
        default=None,
        help="approximate candidates re-scored exactly from the stored CLS vectors per search, saved with "
        "the snapshot (env TVS_INDEX_RERANK; default: the snapshot's when the factory stays, else 0 for Flat "
        "and 40 for the others)",
    )
    p = add(
        "verify",
        cmd_verify,
        "check that catalog, token store and index agree (exit 1 if not)",
        [pipe, device],
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="fix what disagrees (re-encodes damaged videos; deletes stray files of interrupted uploads)",
    )
    p = add("compact", cmd_compact, "prune change-feed rows that every model's index snapshot covers")
    p.description = (
        "Prune the change feed: delete each model's change rows that its index snapshot on disk covers and "
        "that are older than the retention window, and record how far each feed was pruned. A running "
        "API replica whose position is below that finds out and reloads the snapshot (or rebuilds its index) "
        "instead of missing changes. A model without a snapshot keeps its rows. The service and the other "
        "commands also prune after each snapshot they save."
    )
    p.add_argument(
        "--retention-s",
        type=_seconds,
        default=None,
        help=f"keep changes younger than this many seconds even when a snapshot covers them (env TVS_FEED_RETENTION_S; "
        f"default {DEFAULT_RETENTION_S:g})",
    )
    add("stats", cmd_stats, "counts of videos, segments and jobs")
    p = add("rm", cmd_rm, "delete videos: gone from search at once, files freed after")
    p.add_argument("video_ids", nargs="+", type=int, metavar="VIDEO_ID")
    return parser


def _index_device(value: str) -> str:
    from indexer.index_device import IndexDeviceError, check_index_device

    try:
        return check_index_device(value)
    except IndexDeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return seconds
