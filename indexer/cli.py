"""The `indexer` command line: thin subcommands over the indexer's library functions."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.errors import IndexerError, UserError
from indexer.feed_compaction import DEFAULT_RETENTION_S, RETENTION_ENV, retention_from_env
from indexer.log_setup import configure_logging
from indexer.paths import DataDir
from indexer.schema import AUTO_MIGRATE_ENV, ensure_schema
from indexer.settings import SharedSettings

if TYPE_CHECKING:  # the pipeline pulls in torch and the decoders: loaded only by commands that index
    from indexer.milvus_index import MilvusIndex
    from indexer.pipeline import PipelineConfig, TaskResult

logger = logging.getLogger(__name__)

# Commands that run as a service log at TVS_LOG_LEVEL; the others print their result and log only warnings,
# unless TVS_LOG_LEVEL is set or -v is given.
_SERVICE_COMMANDS = {"worker"}


class UsageError(IndexerError, UserError):
    """A problem with the command's input or setup; printed without a traceback (exit 2)."""


@dataclass
class Env:
    args: argparse.Namespace
    settings: SharedSettings
    data: DataDir
    url: str

    def sessions(self) -> sessionmaker[Session]:
        """Sessions on the catalog, whose schema is created (empty database) or upgraded first where allowed."""
        engine = make_engine(self.url)
        ensure_schema(engine, auto_migrate=self.settings.auto_migrate)
        return make_session_factory(engine)

    def model(self, spec: str | None = None) -> Any:
        import torch

        from model.checkpoint import load_model
        from model.inference import prepare_for_inference

        s = self.settings
        if s.device and s.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"TVS_DEVICE={s.device} but torch sees no CUDA device here; use cpu or unset it")
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        return prepare_for_inference(load_model(spec or s.model), s.device, s.precision)

    def model_id(self, factory: sessionmaker[Session]) -> str:
        """The model named by --model / TVS_MODEL, else the catalog's active one (no weights loaded)."""
        if "model" in self.settings.model_fields_set:
            return str(self.model().model_id)
        with session_scope(factory) as session:
            active = catalog.get_active_model(session)
        if active is None:
            raise UsageError("no model is active yet: index some videos first (`indexer add PATH`)")
        return active.id

    def milvus(self, factory: sessionmaker[Session], model_id: str) -> MilvusIndex | None:
        """The model's Milvus collection when --backend milvus (TVS_VECTOR_BACKEND), else None (FAISS)."""
        if self.args.backend != "milvus":
            return None
        from indexer.milvus_index import MilvusIndex, MilvusIndexSpecError, config_from_env

        with session_scope(factory) as session:
            model = catalog.get_model(session, model_id)
        if model is None:
            raise UsageError(f"model {model_id!r} is not registered in the catalog; index some videos first")
        try:
            config = config_from_env(self.data.root, self.args.milvus_uri)
        except (MilvusIndexSpecError, ValueError) as e:
            raise UsageError(str(e)) from e
        return MilvusIndex(config, model_id, model.dim, model.num_frames).open()

    def pipeline_config(self) -> PipelineConfig:
        from indexer.pipeline import PipelineConfig

        a = self.args
        return PipelineConfig(a.max_segment_s, a.window_s, a.batch_size, a.decode_threads)

    def emit(self, payload: dict[str, Any], text: str) -> None:
        print(json.dumps(payload, default=str) if self.args.json else text)


class Progress:
    """A tqdm bar over videos with segments/s and ETA; silent when --json or not a terminal."""

    def __init__(self, env: Env, what: str) -> None:
        self._disable = True if env.args.json else None
        self._what = what
        self._bar: Any = None
        self._segments = 0
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        from tqdm import tqdm

        with self._lock:
            if self._bar is None:
                self._bar = tqdm(total=total, unit="video", desc=self._what, disable=self._disable)
            else:
                self._bar.total = total
                self._bar.refresh()

    def skip(self) -> None:
        """A file that needed no work (indexed or failed in an earlier run)."""
        with self._lock:
            if self._bar is not None:
                self._bar.update(1)

    def result(self, result: TaskResult) -> None:
        with self._lock:
            if self._bar is None or not (result.ok or not result.retryable):
                return
            self._segments += len(result.segment_ids)
            elapsed = self._bar.format_dict.get("elapsed") or 1e-9
            self._bar.set_postfix(segments=self._segments, seg_per_s=f"{self._segments / elapsed:.1f}")
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _failures(failed: dict[str, str]) -> str:
    if not failed:
        return ""
    return f"\n{len(failed)} failed:\n" + "\n".join(f"  {path}: {reason}" for path, reason in failed.items())


def _skips(report: Any, verbose: bool) -> str:
    """Counts by reason; each file with --verbose."""
    if not report.skipped:
        return ""
    lines = [f"{len(report.skipped)} skipped (not a video FFmpeg can decode):"]
    lines += [f"  {count} {reason}" for reason, count in report.skipped_by_reason().items()]
    if verbose:
        lines += [f"  {path}: {reason}" for path, reason in report.skipped.items()]
    else:
        lines.append("  (--verbose or --json lists the files)")
    return "\n" + "\n".join(lines)


# --- commands ---------------------------------------------------------------------------------------------
def cmd_migrate(env: Env) -> int:
    engine = make_engine(env.url)
    try:
        ensure_schema(engine, auto_migrate=True)
    finally:
        engine.dispose()
    url = make_url(env.url).render_as_string(hide_password=True)
    env.emit({"migrated": url}, f"the catalog at {url} is at the newest schema revision")
    return 0


def cmd_add(env: Env) -> int:
    from indexer.bulk import add_paths
    from indexer.catalog import register_model

    factory, model, bar = env.sessions(), env.model(), Progress(env, "indexing")
    a = env.args
    register_model(factory, model, require_active=True)
    sink = env.milvus(factory, model.model_id)
    try:
        report = add_paths(
            factory,
            env.data,
            model,
            a.paths,
            mode=a.mode.replace("-", "_"),
            recursive=not a.no_recursive,
            max_attempts=a.max_attempts,
            retry_failed=a.retry_failed,
            config=env.pipeline_config(),
            on_start=bar.start,
            on_skip=bar.skip,
            on_result=bar.result,
            sink=sink,
        )
    finally:
        bar.close()
    text = (
        f"{report.files} file(s): {report.indexed} indexed, {report.already} already indexed, "
        f"{len(report.failed)} failed, {len(report.skipped)} skipped; "
        f"{report.segments} segments in {report.seconds:.1f} s"
    )
    env.emit(report.to_dict(), text + _failures(report.failed) + _skips(report, a.verbose))
    return 1 if report.failed else 0


def cmd_worker(env: Env) -> int:
    from indexer.catalog import register_model
    from indexer.worker import Worker

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())  # finish the videos in hand, then exit
    a = env.args
    factory, model = env.sessions(), env.model()
    register_model(factory, model, require_active=True)
    worker = Worker(
        factory,
        env.data,
        model,
        lease_s=a.lease_s,
        poll_s=a.poll_s,
        config=env.pipeline_config(),
        sink=env.milvus(factory, model.model_id),
    )
    logger.info("worker %s waiting for jobs", worker.worker_id)
    try:
        worker.run(stop)
    finally:
        worker.close()
    return 0


def cmd_watch(env: Env) -> int:
    from indexer.watch import watch

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())  # finish the videos in hand, then exit
    a = env.args

    def say(line: str) -> None:
        print(json.dumps({"event": line}) if a.json else line, flush=True)

    watch(
        env.sessions(), env.data, env.model(), a.folders, stop, say,
        settle_s=a.settle_s, debounce_ms=a.debounce_ms, config=env.pipeline_config(),
    )  # fmt: skip
    return 0


def cmd_reindex(env: Env) -> int:
    from indexer.bulk import reindex

    a = env.args
    if a.engine != "ray" and (a.address is not None or a.encoders is not None):
        raise UsageError("--address and --encoders belong to --engine ray")
    engine = None
    if a.engine == "ray":
        from indexer.ray_engine import RayOptions, import_ray, ray_engine

        import_ray()  # before loading the model: a missing extra is reported at once
        engine = ray_engine(RayOptions(a.address, a.encoders))
    factory, model, bar = env.sessions(), env.model(), Progress(env, "reindexing")
    milvus = None
    if a.backend == "milvus":
        if engine is not None:
            raise UsageError("--engine ray does not write to Milvus yet: reindex locally, or on FAISS")
        from indexer.catalog import register_model

        register_model(factory, model, require_active=False)
        milvus = env.milvus(factory, model.model_id)
    try:
        report = reindex(
            factory,
            env.data,
            model,
            all_videos=a.all,
            config=env.pipeline_config(),
            on_start=bar.start,
            on_result=bar.result,
            engine=engine,
            milvus=milvus,
        )
    finally:
        bar.close()
    switched = f"; the active model is now {model.model_id}" if report.switched else ""
    text = f"{report.indexed} of {report.files} video(s) indexed with {model.model_id}{switched}"
    env.emit(report.to_dict(), text + _failures(report.failed))
    return 1 if report.failed else 0


def cmd_rebuild_index(env: Env) -> int:
    from indexer.index_device import resolve_index_device
    from indexer.live_index import save_snapshot

    a = env.args
    factory = env.sessions()
    milvus = env.milvus(factory, env.model_id(factory))
    if milvus is not None:
        from indexer.milvus_sync import rebuild

        count = rebuild(milvus, env.data, factory, milvus.model_id)
        payload = {
            "model_id": milvus.model_id,
            "count": count,
            "backend": "milvus",
            "collection": milvus.name,
        }
        env.emit(payload, f"rebuilt {milvus.model_id} in Milvus collection {milvus.name}: {count} segments")
        return 0
    resolve_index_device(a.index_device)  # an unusable GPU fails before any work
    manifest = save_snapshot(
        env.data,
        factory,
        env.model_id(factory),
        rebuild=True,
        factory=a.factory,
        nprobe=a.index_nprobe,
        ef_search=a.index_ef_search,
        rerank=a.index_rerank,
        device=a.index_device,
    )
    knobs = ", ".join(
        f"{k} {manifest[k]}" for k in ("nprobe", "ef_search", "rerank") if manifest.get(k) is not None
    )
    env.emit(
        manifest,
        f"rebuilt {manifest['model_id']}: {manifest['count']} segments ({manifest['factory']}"
        + (f"; {knobs}" if knobs else "")
        + ")",
    )
    return 0


def cmd_verify(env: Env) -> int:
    from indexer.index_device import resolve_index_device
    from indexer.verify import verify

    a = env.args
    resolve_index_device(a.index_device)  # an unusable GPU fails before any work
    factory = env.sessions()
    model_id = env.model_id(factory)
    milvus = env.milvus(factory, model_id)
    report = verify(env.data, factory, model_id, repair=a.repair, index_device=a.index_device, milvus=milvus)
    if a.repair and report.requeued_jobs:
        _run_jobs(env, factory, report.requeued_jobs, milvus)
        report = verify(env.data, factory, model_id, repair=True, index_device=a.index_device, milvus=milvus)
    env.emit(report.to_dict(), _verify_text(report))
    return 0 if report.ok else 1


def _run_jobs(
    env: Env, factory: sessionmaker[Session], job_ids: list[int], milvus: MilvusIndex | None = None
) -> None:
    from indexer import jobs
    from indexer.worker import Worker

    def settled() -> bool:
        with session_scope(factory) as session:
            return all(
                (j := jobs.get_job(session, i)) is None or j.state in ("ready", "failed") for i in job_ids
            )

    worker = Worker(factory, env.data, env.model(), config=env.pipeline_config(), sink=milvus)
    try:
        worker.run(until=settled)
    finally:
        worker.close()


def _verify_text(report: Any) -> str:
    lines = [f"model {report.model_id}: {report.segments} segments, {report.indexed} in the snapshot"]
    lines += [f"repaired: {action}" for action in report.repaired]
    checks = {
        "snapshot": None if report.snapshot == "ok" else report.snapshot,
        "segments without a token record": report.missing_tokens,
        "orphan token records": report.orphan_tokens,
        "segments missing from the snapshot": report.index_missing,
        "snapshot ids with no segment (deleted)": report.index_extra,
        "ready videos without segments": report.videos_without_segments,
        "videos whose file is gone (warning)": report.missing_files,
        "stray files no video owns (warning; --repair deletes them)": report.stray_files,
    }
    lines += [
        f"{name}: {value if isinstance(value, str) else value[:20]}"
        for name, value in checks.items()
        if value
    ]
    lines.append(
        "OK: catalog, token store and index agree" if report.ok else "NOT OK (try `indexer verify --repair`)"
    )
    return "\n".join(lines)


def cmd_compact(env: Env) -> int:
    from indexer.feed_compaction import compact_feed

    report = compact_feed(env.data, env.sessions(), env.args.retention_s)
    lines = [
        f"{m.model_id}: pruned {m.pruned} change row(s) through seq {m.horizon}, {m.kept} kept"
        if m.snapshot_seq is not None
        else f"{m.model_id}: no index snapshot, so nothing pruned ({m.kept} change row(s) kept)"
        for m in report.models
    ]
    total = (
        f"pruned {report.pruned} change row(s) older than {report.retention_s:g} s that the snapshots cover"
    )
    env.emit(report.to_dict(), "\n".join([*lines, total]))
    return 0


def cmd_stats(env: Env) -> int:
    factory = env.sessions()
    with session_scope(factory) as session:
        stats = catalog.catalog_stats(session)
        active = catalog.get_active_model(session)
    payload = {
        "data_dir": str(env.data.root),
        "active_model": active.id if active else None,
        "videos": stats.videos_by_status,
        "segments": stats.segments,
        "jobs": stats.jobs_by_state,
    }
    env.emit(payload, "\n".join(f"{key}: {value}" for key, value in payload.items()))
    return 0


def cmd_rm(env: Env) -> int:
    from indexer.ingest import delete_video

    factory, missing = env.sessions(), []
    with session_scope(factory) as session:
        active = catalog.get_active_model(session)
    sink = env.milvus(factory, active.id) if active is not None else None
    for video_id in env.args.video_ids:
        if delete_video(factory, env.data, video_id, sink=sink) is None:
            missing.append(video_id)
    env.emit(
        {"deleted": [v for v in env.args.video_ids if v not in missing], "not_found": missing},
        f"deleted {len(env.args.video_ids) - len(missing)} video(s)"
        + (f"; not found: {missing}" if missing else ""),
    )
    return 1 if missing else 0


# --- parser -----------------------------------------------------------------------------------------------
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
        default=os.environ.get("TVS_VECTOR_BACKEND") or "faiss",
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
        "TVS_PRECISION, TVS_TORCH_THREADS, TVS_LOG_LEVEL, TVS_LOG_FORMAT (text|json). Flags win over them.",
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
        default=os.environ.get("TVS_INDEX_DEVICE", "auto"),
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
        default=_env_int("TVS_INDEX_NPROBE"),
        help="IVF lists scanned per search, saved with the snapshot (env TVS_INDEX_NPROBE; default: the "
        "snapshot's when the factory stays, else 1); IVF factories only",
    )
    p.add_argument(
        "--index-ef-search",
        type=int,
        default=_env_int("TVS_INDEX_EF_SEARCH"),
        help="HNSW candidate pool, saved with the snapshot (env TVS_INDEX_EF_SEARCH; default: the snapshot's "
        "when the factory stays, else 16); HNSW factories only",
    )
    p.add_argument(
        "--index-rerank",
        type=int,
        default=_env_int("TVS_INDEX_RERANK"),
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
        default=_env_retention(),
        help=f"keep changes younger than this many seconds even when a snapshot covers them (env {RETENTION_ENV}; "
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


def _env_retention() -> float:
    try:
        return retention_from_env()
    except ValueError as e:
        raise SystemExit(f"indexer: {e}") from None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"indexer: {name}={value!r} is not an integer") from None


def load_settings(args: argparse.Namespace) -> SharedSettings:
    """TVS_* and .env, with the command's flags on top; UsageError naming each bad value."""
    flags = {"data_dir": args.data_dir, "database_url": args.database_url, "model": args.model}
    try:
        return SharedSettings(**{name: value for name, value in flags.items() if value is not None})
    except ValidationError as e:
        problems = "; ".join(_readable(err) for err in e.errors())
        raise UsageError(f"invalid settings: {problems}") from e


def _readable(error: Any) -> str:
    name = f"TVS_{'_'.join(map(str, error['loc'])).upper()}"
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
