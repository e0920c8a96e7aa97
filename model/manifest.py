"""Training and evaluation captions: the project's JSONL manifest and MSR-VTT's release files, read into Samples."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import ModelError, UserError

logger = logging.getLogger(__name__)

# (resolved video path, start, end): one decoded clip, shared by every caption that points at it.
ClipKey = tuple[str, "float | None", "float | None"]


class ManifestError(ModelError, UserError, ValueError):
    """A manifest line or an annotation file is malformed, or names a video that does not exist."""


@dataclass(frozen=True)
class Sample:
    video_path: Path
    caption: str
    start: float | None = None
    end: float | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def clip(self) -> ClipKey:
        return (str(self.video_path), self.start, self.end)


def read_manifest(path: str | os.PathLike[str], require_videos: bool = True) -> list[Sample]:
    """JSONL lines {"video", "caption", optional "start"/"end", any extra keys (kept in meta)}."""
    path = Path(path)
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(
                    f"{where}: not valid JSON ({e.msg}); expected one JSON object per line"
                ) from e
            if not isinstance(row, dict) or not isinstance(row.get("video"), str):
                raise ManifestError(f'{where}: expected an object with a "video" path string')
            if not isinstance(row.get("caption"), str) or not row["caption"].strip():
                raise ManifestError(f'{where}: expected a non-empty "caption" string')
            times = [row.get(k) for k in ("start", "end")]
            if any(t is not None and not isinstance(t, (int, float)) for t in times):
                raise ManifestError(f'{where}: "start"/"end" must be numbers of seconds, got {times}')
            start, end = (float(t) if t is not None else None for t in times)
            if start is not None and end is not None and end <= start:
                raise ManifestError(f"{where}: end ({end}) must be after start ({start})")
            video = Path(row["video"]) if os.path.isabs(row["video"]) else path.parent / row["video"]
            if require_videos and not video.is_file():
                raise ManifestError(
                    f"{where}: video {video} does not exist (paths are relative to {path.parent})"
                )
            meta = {k: v for k, v in row.items() if k not in ("video", "caption", "start", "end")}
            samples.append(Sample(video.resolve(), row["caption"].strip(), start, end, meta))
    if not samples:
        raise ManifestError(f"{path} holds no samples; expected JSONL lines with video and caption")
    return samples


MSRVTT_SPLITS = ("train-9k", "test-1k-A", "train", "val", "test")


def read_msrvtt(
    root: str | os.PathLike[str],
    split: str = "test-1k-A",
    videos_dir: str | os.PathLike[str] | None = None,
    require_videos: bool = True,
) -> list[Sample]:
    """MSR-VTT from its release files in `root`; videos are `videos_dir/videoNNNN.mp4` (default root/videos).

    test-1k-A: MSRVTT_JSFUSION_test.csv (one caption per video); train-9k: every caption of the videos in
    MSRVTT_train.9k.csv; train/val/test: the official split of the *_videodatainfo.json files.
    """
    root = Path(root)
    vdir = Path(videos_dir) if videos_dir is not None else root / "videos"
    if split not in MSRVTT_SPLITS:
        raise ManifestError(f"unknown MSR-VTT split {split!r}; expected one of {MSRVTT_SPLITS}")
    rows: list[tuple[str, str, dict[str, Any]]] = []  # (video id, caption, meta)
    if split == "test-1k-A":
        for r in _read_csv(root / "MSRVTT_JSFUSION_test.csv", ("video_id", "sentence")):
            rows.append((r["video_id"], r["sentence"], {"video_id": r["video_id"], "key": r["key"]}))
    else:
        wanted = None
        if split == "train-9k":
            wanted = {r["video_id"] for r in _read_csv(root / "MSRVTT_train.9k.csv", ("video_id",))}
        tv, test = "train_val_videodatainfo.json", "test_videodatainfo.json"
        files = {"train-9k": [tv, test], "train": [tv], "val": [tv], "test": [test]}[split]
        official = {"val": "validate"}.get(split, split)
        for name in files:
            info = _read_json(root / name)
            videos = {v["video_id"]: v for v in info["videos"]}
            for s in info["sentences"]:
                v = videos.get(s["video_id"])
                if v is None or (wanted is not None and s["video_id"] not in wanted):
                    continue
                if wanted is None and v["split"] != official:
                    continue
                meta = {"video_id": s["video_id"], "sen_id": s["sen_id"], "category": v.get("category")}
                rows.append((s["video_id"], s["caption"], meta))
    # "start time"/"end time" in the JSON locate the clip in its YouTube source; the released files are
    # already cut, so every sample is the whole file.
    vdir = vdir.resolve()
    paths = {vid: vdir / f"{vid}.mp4" for vid in dict.fromkeys(r[0] for r in rows)}
    samples = [Sample(paths[vid], cap.strip(), None, None, meta) for vid, cap, meta in rows]
    if require_videos:
        missing = sorted(str(p) for p in paths.values() if not p.is_file())
        if missing:
            raise ManifestError(
                f"{len(missing)} MSR-VTT videos of split {split!r} are missing, e.g. {missing[0]}; "
                "put videoNNNN.mp4 files there or pass the folder holding them (videos_dir / --msrvtt-videos)"
            )
    return samples


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError as e:
        raise ManifestError(f"{path} not found; expected MSR-VTT's release files in {path.parent}") from e
    if rows and not set(columns) <= set(rows[0]):
        raise ManifestError(f"{path}: expected columns {list(columns)}, got {list(rows[0])}")
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ManifestError(f"{path} not found; expected MSR-VTT's release files in {path.parent}") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e.msg})") from e
    if not isinstance(data, dict) or "videos" not in data or "sentences" not in data:
        raise ManifestError(f'{path}: expected an object with "videos" and "sentences" lists')
    return data
