"""Training and evaluation data loading: a decoded-frame cache, the clip set, a batch sampler (readers: model.manifest)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from model.manifest import ClipKey, Sample

logger = logging.getLogger(__name__)

Decoder = Callable[..., np.ndarray]  # read_clip(path, num_frames, size, start=None, end=None)


def default_cache_dir() -> Path:
    """Where decoded clips are kept between runs: $XDG_CACHE_HOME/tokenbinder/frames (or ~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenbinder" / "frames"


class FrameCache:
    """Decoded clips as uint8 [T, S, S, 3] .npy files, memory-mapped on read.

    Keyed by path + mtime + size + T + S + start/end, so a cache survives across runs and epochs and a changed
    file is decoded again. Failures are remembered the same way (a .err file with the reason).
    """

    def __init__(
        self, directory: str | os.PathLike[str], num_frames: int, size: int, decoder: Decoder | None = None
    ) -> None:
        self.directory = Path(directory)
        self.num_frames, self.size = num_frames, size
        self._decoder = decoder

    def _file(self, clip: ClipKey, suffix: str) -> Path:
        path, start, end = clip
        st = os.stat(path)
        ident = f"{path}|{st.st_mtime_ns}|{st.st_size}|{self.num_frames}|{self.size}|{start}|{end}"
        key = hashlib.sha1(ident.encode()).hexdigest()
        return self.directory / key[:2] / f"{key}{suffix}"

    def load(self, clip: ClipKey) -> np.ndarray:
        return np.load(self._file(clip, ".npy"), mmap_mode="r")

    def fill(self, clips: Sequence[ClipKey], workers: int = 2, progress: bool = True) -> dict[ClipKey, str]:
        """Decode every clip not yet cached; returns {clip: reason} for those that cannot be decoded."""
        failures: dict[ClipKey, str] = {}
        todo = []
        for clip in dict.fromkeys(clips):
            try:
                npy, err = self._file(clip, ".npy"), self._file(clip, ".err")
            except OSError as e:
                failures[clip] = f"cannot stat: {e}"
                continue
            if err.is_file():
                failures[clip] = err.read_text()
            elif not npy.is_file():
                todo.append((clip, npy, err))
        if todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="decoding clips", unit="clip", disable=not progress)
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for clip, reason in pool.map(self._decode_one, todo):
                    if reason is not None:
                        failures[clip] = reason
                    bar.update()
            bar.close()
        for clip, reason in failures.items():
            logger.warning("skipping %s: %s", clip[0], reason)
        return failures

    def _decode_one(self, job: tuple[ClipKey, Path, Path]) -> tuple[ClipKey, str | None]:
        from model.video import VideoDecodeError, read_clip

        clip, npy, err = job
        decode = self._decoder or read_clip
        npy.parent.mkdir(parents=True, exist_ok=True)
        try:
            frames = decode(clip[0], self.num_frames, self.size, start=clip[1], end=clip[2])
        except (VideoDecodeError, OSError, ValueError, RuntimeError) as e:
            reason = f"{type(e).__name__}: {e}"
            err.write_text(reason)
            return clip, reason
        expected = (self.num_frames, self.size, self.size, 3)
        if frames.shape != expected or frames.dtype != np.uint8:
            return clip, f"decoder returned {frames.dtype} {frames.shape}, expected uint8 {expected}"
        tmp = npy.with_name(f"{npy.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, frames)
        os.replace(tmp, npy)
        return clip, None


class ClipSet:
    """Samples whose clips decoded, each mapped to its clip; frames are read from the cache on demand."""

    def __init__(self, samples: Sequence[Sample], cache: FrameCache, failures: dict[ClipKey, str]) -> None:
        self.samples = [s for s in samples if s.clip not in failures]
        self.failures = failures
        self.cache = cache
        self.clips: list[ClipKey] = list(dict.fromkeys(s.clip for s in self.samples))
        index = {c: i for i, c in enumerate(self.clips)}
        self.clip_index = np.array([index[s.clip] for s in self.samples], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def frames(self, clip_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 [B, T, S, S, 3] for the given clip indices."""
        out = []
        for c in np.asarray(clip_ids).tolist():
            if c not in self._maps:
                self._maps[c] = self.cache.load(self.clips[c])
            out.append(self._maps[c])
        return np.stack(out)


def prepare_clips(
    samples: Sequence[Sample], cache: FrameCache, workers: int = 2, progress: bool = True
) -> ClipSet:
    """Decode (once, into the cache) every distinct clip of the samples; undecodable ones are dropped."""
    failures = cache.fill([s.clip for s in samples], workers=workers, progress=progress)
    clipset = ClipSet(samples, cache, failures)
    if failures:
        logger.warning(
            "%d of %d clips could not be decoded and were skipped",
            len(failures),
            len(failures) + len(clipset.clips),
        )
    return clipset


class UniqueVideoBatchSampler:
    """Shuffled batches in which no two samples share a video (they would be each other's false negatives).

    `groups` (optional, one label per sample) puts the samples of one label in one batch: hard in-batch
    negatives, e.g. a synthetic family's near-identical siblings. Groups are packed whole (first fit, in a
    shuffled order), so no group is cut at a batch boundary and a batch may run a few samples short of
    `batch_size` (fewer than the largest group); a group larger than a batch, or one holding two captions
    of a video, is split. `multiple_of` (the number of processes) trims each such batch to a multiple of it.
    Batches are a function of (seed, epoch) only, so every process and a resumed run see the same order.
    """

    def __init__(
        self,
        videos: Sequence[Hashable] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        groups: Sequence[Hashable] | None = None,
        multiple_of: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if multiple_of < 1 or batch_size % multiple_of:
            raise ValueError(f"batch_size {batch_size} is not a multiple of {multiple_of}")
        self.videos, self.batch_size, self.seed, self.drop_last = list(videos), batch_size, seed, drop_last
        self.multiple_of = multiple_of
        self.groups = list(groups) if groups is not None else None
        self.epoch = 0
        self._memo: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self._memo is not None and self._memo[0] == self.epoch:
            return self._memo[1]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches = self._grouped(rng) if self.groups is not None else self._shuffled(rng)
        self._memo = (self.epoch, batches)
        return batches

    def _chunks(self, rng: random.Random) -> list[list[int]]:
        """Each group (in a shuffled order, its members shuffled) as few batch-sized, video-unique parts."""
        assert self.groups is not None
        members: dict[Hashable, list[int]] = {}
        for i, g in enumerate(self.groups):
            members.setdefault(g, []).append(i)
        keys = list(members)
        rng.shuffle(keys)
        chunks: list[list[int]] = []
        for g in keys:
            rng.shuffle(members[g])
            parts: list[tuple[list[int], set[Hashable]]] = []
            for i in members[g]:
                video = self.videos[i]
                part = next((p for p in parts if video not in p[1] and len(p[0]) < self.batch_size), None)
                if part is None:
                    part = ([], set())
                    parts.append(part)
                part[0].append(i)
                part[1].add(video)
            chunks.extend(p[0] for p in parts)
        return chunks

    def _grouped(self, rng: random.Random) -> list[list[int]]:
        size, videos = self.batch_size, self.videos
        chunks = self._chunks(rng)
        bins: list[tuple[list[int], set[Hashable]]] = []
        open_bins: list[int] = []  # indices into bins that still have room
        for chunk in chunks:
            need = {videos[i] for i in chunk}
            fits = (n for n, b in enumerate(open_bins) if len(bins[b][0]) + len(chunk) <= size)
            n = next((n for n in fits if not bins[open_bins[n]][1] & need), None)
            if n is None:
                n = len(open_bins)
                open_bins.append(len(bins))
                bins.append(([], set()))
            members, seen = bins[open_bins[n]]
            members.extend(chunk)
            seen |= need
            if len(members) == size:
                del open_bins[n]
        largest = max((len(c) for c in chunks), default=1)
        out = []
        for members, _ in bins:
            members = members[: len(members) - len(members) % self.multiple_of]
            if members and (not self.drop_last or len(members) > size - largest):
                out.append(members)
        return out

    def _shuffled(self, rng: random.Random) -> list[list[int]]:
        order = list(range(len(self.videos)))
        rng.shuffle(order)
        size, videos = self.batch_size, self.videos
        batches: list[list[int]] = []
        batch: list[int] = []
        seen: set[Hashable] = set()
        waiting: list[int] = []  # samples whose video is already in the open batch

        def drain() -> None:
            nonlocal batch, seen, waiting
            while True:
                rest = []
                for j in waiting:
                    if len(batch) < size and videos[j] not in seen:
                        batch.append(j)
                        seen.add(videos[j])
                    else:
                        rest.append(j)
                waiting = rest
                if len(batch) < size:
                    return
                batches.append(batch)
                batch, seen = [], set()

        for i in order:
            waiting.append(i)
            drain()
        while batch or waiting:
            batches.append(batch)  # a short batch: what is left conflicts with it
            batch, seen = [], set()
            drain()
        if self.drop_last:
            batches = [b for b in batches if len(b) == size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
