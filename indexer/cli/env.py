"""What every `indexer` command gets: the parsed flags, the settings, the data directory, output and progress."""

from __future__ import annotations

import argparse
import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from indexer import catalog
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.errors import IndexerError, UserError
from indexer.paths import DataDir
from indexer.schema import ensure_schema
from indexer.settings import SharedSettings

if TYPE_CHECKING:  # the pipeline pulls in torch and the decoders: loaded only by commands that index
    from indexer.milvus_index import MilvusIndex
    from indexer.pipeline import PipelineConfig, TaskResult

logger = logging.getLogger(__name__)


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
        if self.settings.vector_backend != "milvus":
            return None
        from indexer.milvus_index import MilvusIndex

        with session_scope(factory) as session:
            model = catalog.get_model(session, model_id)
        if model is None:
            raise UsageError(f"model {model_id!r} is not registered in the catalog; index some videos first")
        return MilvusIndex(self.settings.milvus_config(), model_id, model.dim, model.num_frames).open()

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
