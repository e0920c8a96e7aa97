"""Bulk indexing on a Ray cluster: Ray Data decodes on CPU tasks, encodes on actors, and this process writes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from indexer.errors import IndexerError, UserError
from indexer.paths import DataDir
from indexer.pipeline import EncodedSegment, NoFramesError, PipelineConfig, TaskResult, VideoTask, Writer
from indexer.token_store import TokenStore
from model.tokenbinder import TokenBinder
from model.video import VideoDecodeError, VideoInfo

logger = logging.getLogger(__name__)

_INFO_FIELDS = ("duration_s", "fps", "num_frames", "width", "height")
_ERROR_FIELDS = ("error_type", "error", "error_path", "error_reason")


class RayUnavailableError(IndexerError, UserError, RuntimeError):
    """Ray (with Ray Data) is not installed in this environment."""


class RemoteStageError(IndexerError, RuntimeError):
    """A decode or encode step failed on a Ray worker; the message names the worker's exception."""


def import_ray() -> ModuleType:
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a separate extra of ray)
    except ImportError as e:
        raise RayUnavailableError(
            f"--engine ray needs Ray Data, which is not importable here ({e}); "
            "install it with pip install '.[distributed]' (ray[data])"
        ) from e
    return ray


@dataclass(frozen=True)
class RayOptions:
    # None: RAY_ADDRESS, else a running local cluster, else a new local instance (ray.init's own rules);
    # "local": always a new local instance; "auto": the running cluster; "ray://host:10001": Ray Client.
    address: str | None = None
    encoders: int | None = None  # encoder actors; None: one per GPU of the cluster, else one (CPU)


# --- remote side: run in Ray workers ------------------------------------------------------------------------
def _row(video_id: int, kind: str, **values: Any) -> dict[str, Any]:
    """One row of the decode output; every row has every column so that blocks share one schema."""
    row: dict[str, Any] = {
        "video_id": video_id, "kind": kind, "ordinal": -1, "start": 0.0, "end": 0.0, "count": 0,
        "frames": b"", "thumb": b"", "thumb_h": 0, "thumb_w": 0,
        "error_type": "", "error": "", "error_path": "", "error_reason": "",
        **{name: 0.0 for name in _INFO_FIELDS},
    }  # fmt: skip
    row.update(values)
    return row


def _error_row(video_id: int, e: BaseException) -> dict[str, Any]:
    return _row(
        video_id, "error", error_type=type(e).__name__, error=str(e),
        error_path=str(getattr(e, "path", "")), error_reason=str(getattr(e, "reason", "")),
    )  # fmt: skip


def decode_video(
    item: dict[str, Any], *, num_frames: int, size: int, config: PipelineConfig
) -> Iterator[dict[str, Any]]:
    """One video -> a row per segment (frames, thumbnail), then an `end` row with its info; or an `error` row."""
    from indexer.pipeline import read_video

    video_id = int(item["video_id"])
    count = 0
    try:
        info, _, frames = read_video(item["path"], num_frames, size, config)
        for seg in frames:
            thumb = np.ascontiguousarray(seg.thumbnail, dtype=np.uint8)
            yield _row(
                video_id, "seg", ordinal=seg.index, start=float(seg.start), end=float(seg.end),
                frames=np.ascontiguousarray(seg.frames, dtype=np.uint8).tobytes(), thumb=thumb.tobytes(),
                thumb_h=thumb.shape[0], thumb_w=thumb.shape[1],
            )  # fmt: skip
            count += 1
    except Exception as e:  # this video's failure; the dataset goes on with the others
        yield _error_row(video_id, e)
        return
    yield _row(video_id, "end", count=count, **{name: float(getattr(info, name)) for name in _INFO_FIELDS})


class EncodeActor:
    """A Ray Data actor holding the model: encodes the `seg` rows of a batch, passes the others through."""

    def __init__(self, payload: list[Any], num_frames: int, size: int) -> None:
        import ray
        import torch

        from model.config import TokenBinderConfig
        from model.inference import prepare_for_inference

        shipped = ray.get(payload[0])  # a list around the ref: Ray Data passes it on unresolved
        config = TokenBinderConfig.from_dict(json.loads(shipped["config"]))
        # The weights come from the driver's model; never from the hub or a path this node may not have.
        built = TokenBinder(
            TokenBinderConfig.from_dict({**json.loads(shipped["config"]), "pretrained": None})
        )
        built.load_state_dict(shipped["state"])
        built.config, built.model_id = config, shipped["model_id"]
        from indexer.pipeline import Encoder

        self.encoder = Encoder(prepare_for_inference(built))
        self.shape = (num_frames, size, size, 3)
        logger.info("encoder actor ready: %s on %s (torch threads %d)", built.model_id, built.device,
                    torch.get_num_threads())  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {name: values for name, values in batch.items() if name != "frames"}
        for name in ("kind", *_ERROR_FIELDS):  # fixed-width numpy strings would truncate a new value
            out[name] = out[name].astype(object)
        n = len(out["kind"])
        out["tokens"], out["cls"] = np.full(n, b"", dtype=object), np.full(n, b"", dtype=object)
        segs = np.flatnonzero(out["kind"] == "seg")
        if not len(segs):
            return out
        try:
            frames = np.stack([np.frombuffer(batch["frames"][i], np.uint8).reshape(self.shape) for i in segs])
            tokens, cls = self.encoder.encode(frames)  # [N, T, D], [N, D] float32
        except Exception as e:  # these segments' videos fail; the rest of the library goes on
            error = _error_row(0, e)
            for i in segs:
                for name in ("kind", *_ERROR_FIELDS):
                    out[name][i] = error[name]
            return out
        for j, i in enumerate(segs):
            out["tokens"][i] = np.ascontiguousarray(tokens[j], np.float32).tobytes()
            out["cls"][i] = np.ascontiguousarray(cls[j], np.float32).tobytes()
        return out


# --- driver side ----------------------------------------------------------------------------------------
@dataclass
class _Pending:
    task: VideoTask
    segments: list[EncodedSegment] = field(default_factory=list)
    expected: int | None = None  # set by the `end` row, which may overtake the video's last segments
    info: VideoInfo | None = None


def _remote_error(row: dict[str, Any]) -> Exception:
    """The worker's exception, rebuilt where its type matters (a bad file is not retried)."""
    kind, message = str(row["error_type"]), str(row["error"])
    if kind == "VideoDecodeError":
        error = VideoDecodeError.__new__(VideoDecodeError)
        Exception.__init__(error, message)
        error.path, error.reason = str(row["error_path"]), str(row["error_reason"])
        return error
    if kind == "NoFramesError":
        return NoFramesError(message)
    return RemoteStageError(f"{kind} on a Ray worker: {message}")


class RayEngine:
    """`process(tasks)` like Worker.process, with decoding and encoding spread over a Ray cluster.

    The driver (this process) is the only writer: it commits each video through the same `Writer` as
    the local engine (thumbnails, durable tokens, then one catalog transaction), so the token store and
    catalog see exactly one writer and the single-writer rules of the data directory hold.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        data: DataDir,
        model: TokenBinder,
        *,
        config: PipelineConfig | None = None,
        on_result: Callable[[TaskResult], None] | None = None,
        options: RayOptions | None = None,
    ) -> None:
        self.ray = import_ray()
        self.options = options or RayOptions()
        self.config = config or PipelineConfig()
        self.model, self.model_id = model, model.model_id
        self._on_result = on_result
        self._started_ray = False
        if not self.ray.is_initialized():
            self.ray.init(address=self.options.address, include_dashboard=False)
            self._started_ray = True
        cfg = model.config
        self.store = TokenStore(data.tokens_dir(self.model_id), cfg.num_frames, cfg.embed_dim)
        self.writer = Writer(
            session_factory, data, self.model_id, self.store, jpeg_quality=self.config.jpeg_quality
        )
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        self._model_ref = self.ray.put({"config": cfg.to_json(), "state": state, "model_id": self.model_id})

    def _encoders(self) -> tuple[int, dict[str, float]]:
        gpus = int(self.ray.cluster_resources().get("GPU", 0))
        count = self.options.encoders or max(1, gpus)
        return count, ({"num_gpus": 1} if gpus else {"num_cpus": 1})

    def dataset(self, tasks: list[VideoTask]) -> Any:
        """The lazy Ray Dataset: a row per video -> decode tasks -> encoder actors."""
        ray, cfg, mcfg = self.ray, self.config, self.model.config
        items = [{"video_id": t.video_id, "path": str(t.path)} for t in tasks]
        count, resources = self._encoders()
        logger.info("ray: %d video(s), %d encoder actor(s) with %s", len(items), count, resources)
        return (
            ray.data.from_items(items, override_num_blocks=len(items))  # a decode task per video
            .flat_map(decode_video, num_cpus=1,
                      fn_kwargs={"num_frames": mcfg.num_frames, "size": mcfg.image_size, "config": cfg})
            .map_batches(
                EncodeActor, batch_size=cfg.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=count),
                fn_constructor_kwargs={"payload": [self._model_ref], "num_frames": mcfg.num_frames,
                                       "size": mcfg.image_size},
                **resources,
            )
        )  # fmt: skip

    def process(self, tasks: Iterable[VideoTask]) -> None:
        """Index the tasks; each video's outcome goes to `on_result` as soon as it is committed or failed."""
        todo = list(tasks)
        if not todo:
            return
        pending = {t.video_id: _Pending(t) for t in todo}
        context = self.ray.data.DataContext.get_current()
        bars, context.enable_progress_bars = context.enable_progress_bars, False  # the CLI draws its own
        try:
            for row in self.dataset(todo).iter_rows():
                self._take(pending, row)
        finally:
            context.enable_progress_bars = bars
        for video_id in list(pending):  # no end row arrived: a bug, not the video's fault; say so
            self._finish(pending, video_id, error=RemoteStageError("the Ray pipeline returned no end row"))

    def _take(self, pending: dict[int, _Pending], row: dict[str, Any]) -> None:
        video_id = int(row["video_id"])
        entry = pending.get(video_id)
        if entry is None:  # the video already failed; its remaining segments are dropped
            return
        kind = row["kind"]
        if kind == "error":
            self._finish(pending, video_id, error=_remote_error(row))
            return
        if kind == "seg":
            shape = (self.model.config.num_frames, self.model.config.embed_dim)
            entry.segments.append(
                EncodedSegment(
                    int(row["ordinal"]), float(row["start"]), float(row["end"]),
                    np.frombuffer(row["tokens"], np.float32).reshape(shape),
                    np.frombuffer(row["cls"], np.float32),
                    np.frombuffer(row["thumb"], np.uint8).reshape(int(row["thumb_h"]), int(row["thumb_w"]), 3),
                )
            )  # fmt: skip
        else:
            entry.expected = int(row["count"])
            info = {name: row[name] for name in _INFO_FIELDS}
            entry.info = VideoInfo(
                float(info["duration_s"]), float(info["fps"]), int(info["num_frames"]),
                int(info["width"]), int(info["height"]),
            )  # fmt: skip
        if entry.expected is not None and len(entry.segments) == entry.expected:
            self._finish(pending, video_id)

    def _finish(self, pending: dict[int, _Pending], video_id: int, error: Exception | None = None) -> None:
        entry = pending.pop(video_id)
        if error is None:
            assert entry.info is not None
            try:
                result = TaskResult(
                    entry.task, entry.info, self.writer.commit(entry.task, entry.info, entry.segments)
                )
            except Exception as e:
                result = TaskResult(entry.task, entry.info, error=e)
                try:
                    self.writer.discard(entry.task)
                except Exception:  # the next run's commit discards it again; the error above is the news
                    logger.exception("could not free the records of video %s", video_id)
        else:
            logger.warning("video %s failed on the cluster: %s", video_id, error)
            result = TaskResult(entry.task, error=error)
        if self._on_result is not None:
            self._on_result(result)

    def close(self) -> None:
        self.store.close()
        del self._model_ref
        if self._started_ray:
            self.ray.shutdown()


def ray_engine(options: RayOptions) -> Callable[..., RayEngine]:
    """A factory with the signature `indexer.bulk.reindex(engine=...)` calls: (factory, data, model, **kw)."""

    def make(
        session_factory: sessionmaker[Session], data: DataDir, model: TokenBinder, **kwargs: Any
    ) -> RayEngine:
        return RayEngine(session_factory, data, model, options=options, **kwargs)

    return make
