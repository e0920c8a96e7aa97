"""The running service's heavy parts (model, index, worker, searcher), opened in the lifespan and closed after."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.cutoff import load_default_cutoff
from app.ingestion import Ingestor
from app.metrics import Metrics
from app.searcher import Searcher
from app.settings import Settings
from indexer.catalog import register_model
from indexer.db import make_engine, make_session_factory
from indexer.live_index import LiveIndex
from indexer.milvus_index import MilvusIndex
from indexer.paths import DataDir
from indexer.schema import ensure_schema
from indexer.url_fetch import UrlFetcher
from indexer.worker import Worker
from model.checkpoint import load_model
from model.inference import prepare_for_inference
from model.openmp import release_openmp_threads
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    data: DataDir
    model: TokenBinder
    index: LiveIndex | MilvusIndex
    searcher: Searcher
    ingestor: Ingestor
    fetcher: UrlFetcher
    worker: Worker | None
    opened_seq: int = 0  # the change-feed position at start-up: a snapshot is saved only if it moved

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def precision(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def close(self) -> None:
        """Stop the worker, save the index if it moved on, and release the database (blocking)."""
        if self.worker is not None:
            self.worker.close()
        try:
            index = self.index
            if isinstance(index, LiveIndex) and (index.last_seq > self.opened_seq or index.rebuilt):
                index.snapshot()  # a cache for the next start-up (replacing a damaged one); never required
        except OSError as e:
            logger.warning("could not save the index snapshot on shutdown: %s", e)
        self.index.close()
        self.engine.dispose()


def open_services(settings: Settings, metrics: Metrics) -> Services:
    """Load everything the routes need; blocking, so the lifespan runs it in a thread.

    Creates the catalog schema on an empty database and upgrades an older one on SQLite (after a backup
    copy) or, with TVS_AUTO_MIGRATE=true, on PostgreSQL; otherwise fails with
    indexer.db.DatabaseNotMigratedError saying what to run.
    """
    data = DataDir(settings.data_dir).ensure()
    engine = make_engine(settings.database_url or data.database_url)
    opened: list[object] = []
    try:
        ensure_schema(engine, auto_migrate=settings.auto_migrate)
        factory = make_session_factory(engine)
        if settings.torch_threads:
            # Several replicas (or other work) on one machine: oversubscribed OpenMP threads spin and stall.
            torch.set_num_threads(settings.torch_threads)
        model = prepare_for_inference(load_model(settings.model), settings.device, settings.precision)
        register_model(factory, model, require_active=True)
        index = open_index(settings, data, factory, model)
        opened.append(index)
        sink = index if isinstance(index, MilvusIndex) else None
        fetcher = UrlFetcher(
            allow_private=settings.allow_private_urls,
            timeout_s=settings.url_timeout_s,
            max_duration_s=settings.url_max_duration_s,
            max_redirects=settings.url_max_redirects,
        )
        worker = None
        if settings.worker:
            worker = Worker(
                factory, data, model, fetcher=fetcher, max_download_bytes=settings.max_upload_bytes, sink=sink
            )
            opened.append(worker)
            worker.start_thread()
        searcher = Searcher(
            model,
            index,
            factory,
            top_k=settings.top_k,
            batch_max_size=settings.batch_max_size,
            batch_max_wait_s=settings.batch_max_wait_ms / 1000,
            observe=metrics.observe_stage,
            default_cutoff=load_default_cutoff(settings.model, model.model_id),
        )
        searcher.warm_up()
        # Searches run in the batch thread from now on: an OpenMP pool left alive in this loading thread
        # would make every parallel op there wait on sleeping workers (model.openmp).
        release_openmp_threads()
        ingestor = Ingestor(factory, data, model.model_id, tuple(settings.resolved_roots), sink=sink)
    except BaseException:
        for part in reversed(opened):
            part.close()  # type: ignore[attr-defined]
        engine.dispose()
        raise
    opened_seq = index.last_seq if isinstance(index, LiveIndex) else 0
    services = Services(
        settings, engine, factory, data, model, index, searcher, ingestor, fetcher, worker, opened_seq
    )
    logger.info(
        "ready: model %s on %s (%s), %d segments indexed (%s on %s), worker %s",
        model.model_id,
        services.device,
        services.precision,
        index.size,
        index.factory,
        index.device,
        "on" if worker else "off",
    )
    return services


def open_index(
    settings: Settings, data: DataDir, factory: sessionmaker[Session], model: TokenBinder
) -> LiveIndex | MilvusIndex:
    """The broad view TVS_VECTOR_BACKEND names: FAISS in this process (following the change feed), or a
    Milvus collection shared by every replica (nothing held here, nothing to follow)."""
    cfg = model.config
    if settings.vector_backend == "milvus":
        return MilvusIndex(settings.milvus_config(), model.model_id, cfg.embed_dim, cfg.num_frames).open()
    return LiveIndex(
        data,
        factory,
        model.model_id,
        cfg.embed_dim,
        cfg.num_frames,
        factory=settings.index_factory,
        follow_interval_s=settings.follow_interval_s,
        nprobe=settings.index_nprobe,
        ef_search=settings.index_ef_search,
        rerank=settings.index_rerank,
        device=settings.index_device,
        catch_up_s=settings.feed_catch_up_s,
        feed_retention_s=settings.feed_retention_s,
    ).open()
