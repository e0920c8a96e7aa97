"""The `indexer` subcommands: each a few lines over one of the indexer's library functions."""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.db import make_engine, session_scope
from indexer.schema import ensure_schema

if TYPE_CHECKING:  # the pipeline pulls in torch and the decoders: loaded only by commands that index
    from indexer.milvus_index import MilvusIndex
from indexer.cli.env import Env, Progress, UsageError, _failures, _skips

logger = logging.getLogger(__name__)


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
            feed_retention_s=env.settings.feed_retention_s,
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
        feed_retention_s=env.settings.feed_retention_s,
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
    if env.settings.vector_backend == "milvus":
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
            feed_retention_s=env.settings.feed_retention_s,
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
        collection = milvus.collection
        payload = {
            "model_id": milvus.model_id,
            "count": count,
            "backend": "milvus",
            "name": milvus.name,
            "collection": collection,
            "aliases": milvus.generations.aliases,
        }
        how = "alias" if milvus.generations.aliases else "recorded pointer (this Milvus has no aliases)"
        text = f"rebuilt {milvus.model_id} as Milvus collection {collection} ({how} {milvus.name}): {count} segments"
        env.emit(payload, text)
        return 0
    s = env.settings
    resolve_index_device(s.index_device)  # an unusable GPU fails before any work
    manifest = save_snapshot(
        env.data,
        factory,
        env.model_id(factory),
        rebuild=True,
        factory=a.factory,
        nprobe=s.index_nprobe,
        ef_search=s.index_ef_search,
        rerank=s.index_rerank,
        device=s.index_device,
        feed_retention_s=s.feed_retention_s,
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

    a, s = env.args, env.settings
    resolve_index_device(s.index_device)  # an unusable GPU fails before any work
    factory = env.sessions()
    model_id = env.model_id(factory)
    milvus = env.milvus(factory, model_id)
    check = functools.partial(
        verify, env.data, factory, model_id,
        index_device=s.index_device, milvus=milvus, feed_retention_s=s.feed_retention_s,
    )  # fmt: skip
    report = check(repair=a.repair)
    if a.repair and report.requeued_jobs:
        _run_jobs(env, factory, report.requeued_jobs, milvus)
        report = check(repair=True)
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

    report = compact_feed(env.data, env.sessions(), env.settings.feed_retention_s)
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
