"""kill -9 of `indexer add` at random moments: restarting completes the run and everything agrees exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from indexer import catalog
from indexer.catalog import Job, Segment, Video
from indexer.cli import main
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.paths import DataDir
from indexer.token_store import TokenStore
from indexer.vector_index import VectorIndex
from synth.generator import write_pattern_video

REPO = Path(__file__).resolve().parents[2]
VIDEOS = 24
KILLS = 3
RUN_TIMEOUT_S = 240


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TVS_MODEL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "indexer", *args], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _ready(factory) -> int:
    with session_scope(factory) as session:
        return session.scalar(select(func.count()).where(Video.status == "ready")) or 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_restart_completes(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(VIDEOS):
        write_pattern_video(lib / f"clip{i:02d}.mp4", 1.0 + 0.125 * i, 64, 48, 8, gop=8)
    data = DataDir(tmp_path / "data")
    base = ["--data-dir", str(data.root), "--model", "tiny"]
    assert main(["migrate", *base]) == 0
    engine = make_engine(data.database_url)
    factory = make_session_factory(engine)
    rng = random.Random(20240917)

    kills = 0
    while True:
        proc = _spawn(["add", *base, "--json", str(lib)])
        started, ready_at_start = time.monotonic(), _ready(factory)
        # A random moment after the run has made progress (so every restart moves forward and no job is
        # killed on each of its attempts), plus a random delay that lands anywhere within a video's commit.
        target, jitter = ready_at_start + rng.randint(3, 5), rng.uniform(0.0, 0.2)
        killed = False
        while proc.poll() is None and time.monotonic() - started < RUN_TIMEOUT_S:
            if kills < KILLS and _ready(factory) >= target:
                time.sleep(jitter)
                proc.send_signal(signal.SIGKILL)
                killed, kills = True, kills + 1
                break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        if killed:
            assert proc.returncode == -signal.SIGKILL
            continue
        assert proc.returncode == 0, f"the run did not complete:\n{err[-3000:]}"
        break
    assert kills == KILLS, "every kill landed before the library was done"
    report = json.loads(out)
    assert report["files"] == VIDEOS and report["failed"] == {}
    assert report["indexed"] + report["already"] == VIDEOS

    assert main(["verify", *base]) == 0
    with session_scope(factory) as session:
        videos = session.execute(select(Video.id, Video.status, Video.sha256)).all()
        per_video = dict(
            session.execute(select(Segment.video_id, func.count()).group_by(Segment.video_id)).all()
        )
        states = set(session.scalars(select(Job.state)))
        model = catalog.get_active_model(session)
        seg_ids = catalog.segment_ids_for_model(session, model.id)
    assert len(videos) == VIDEOS and {s for _, s, _ in videos} == {"ready"}, "no video missing"
    assert len({sha for _, _, sha in videos}) == VIDEOS and set(per_video.values()) == {1}, "none doubled"
    assert states == {"ready"}
    with TokenStore(data.tokens_dir(model.id), model.num_frames, model.dim, readonly=True) as store:
        record_ids = np.concatenate([ids for ids, _ in store.iter_records()]).tolist()
    index, _ = VectorIndex.load(data.index_path(model.id))
    assert record_ids == seg_ids == index.ids().tolist(), "catalog, token store and FAISS hold the same ids"
    assert not data.pending(model.id), "no journal of an unfinished write is left"
    engine.dispose()
