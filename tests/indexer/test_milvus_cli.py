"""The indexer CLI on Milvus: kill -9 between the Milvus write and the catalog commit, verify --repair,
and moving a FAISS library into Milvus with `rebuild-index --backend milvus`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer import catalog
from indexer.cli import main
from indexer.db import make_engine, make_session_factory, session_scope
from indexer.milvus_index import MilvusIndex
from indexer.paths import DataDir
from indexer.settings import SharedSettings
from indexer.token_store import TokenStore
from synth.generator import write_pattern_video

REPO = Path(__file__).resolve().parents[2]

# `indexer add` whose Milvus writes succeed and then the process dies, before the catalog commit.
DIE_AFTER_MILVUS_WRITE = """
import os, signal, sys
from indexer.milvus_index import MilvusIndex
write = MilvusIndex.add
def write_then_die(self, *args, **kwargs):
    write(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
MilvusIndex.add = write_then_die
from indexer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def library(tmp_path: Path) -> Path:
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(2):
        write_pattern_video(lib / f"clip{i}.mp4", 1.0 + 0.5 * i, 64, 48, 8, gop=8)
    return lib


def _state(data: DataDir) -> tuple[str, list[int], np.ndarray]:
    engine = make_engine(data.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            model = catalog.get_active_model(session)
            assert model is not None
            return model.id, catalog.segment_ids_for_model(session, model.id), _dims(model)
    finally:
        engine.dispose()


def _dims(model: catalog.EmbeddingModel) -> np.ndarray:
    return np.array([model.dim, model.num_frames])


def _collection(data: DataDir, uri: str, model_id: str, dims: np.ndarray) -> MilvusIndex:
    config = SharedSettings(data_dir=data.root, milvus_uri=uri).milvus_config()
    return MilvusIndex(config, model_id, int(dims[0]), int(dims[1])).open()


def test_kill_between_milvus_write_and_commit_leaves_nothing_searchable_and_repair_fixes_it(
    tmp_path: Path, library: Path, milvus_uri: str, milvus_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TVS_MILVUS_PREFIX", milvus_prefix)
    data = DataDir(tmp_path / "data")
    base = [
        "--data-dir",
        str(data.root),
        "--model",
        "tiny",
        "--backend",
        "milvus",
        "--milvus-uri",
        milvus_uri,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", DIE_AFTER_MILVUS_WRITE, "add", *base, "--json", str(library)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    model_id, segments, dims = _state(data)
    with _collection(data, milvus_uri, model_id, dims) as milvus:
        stray = milvus.ids().tolist()
        assert segments == [] and len(stray) == 1, "Milvus holds the rows, the catalog does not"
        _, hits = milvus.search(np.ones((1, int(dims[0])), np.float32), 5)
        assert set(hits[0][hits[0] >= 0].tolist()) <= set(stray), "only the stray rows are there to find"

    capsys_out = _run(["verify", *base, "--json"])
    assert capsys_out[0] == 1 and capsys_out[1]["index_extra"] == stray
    code, report = _run(["verify", "--repair", *base, "--json"])
    assert any("Milvus row(s) the catalog does not have" in a for a in report["repaired"]), report
    with _collection(data, milvus_uri, model_id, dims) as milvus:
        assert milvus.ids().tolist() == [] or milvus.ids().tolist() == _state(data)[1]

    # The interrupted run, run again, completes; catalog, token store and Milvus hold the same ids.
    assert main(["add", *base, str(library)]) == 0
    _, segments, _ = _state(data)
    assert len(segments) == 2
    with _collection(data, milvus_uri, model_id, dims) as milvus:
        assert milvus.ids().tolist() == segments
    assert _run(["verify", *base, "--json"])[0] == 0


def _run(args: list[str]) -> tuple[int, dict]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, json.loads(out.getvalue())


def test_rebuild_index_backend_milvus_moves_a_faiss_library_into_milvus(
    tmp_path: Path,
    library: Path,
    milvus_uri: str,
    milvus_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TVS_MILVUS_PREFIX", milvus_prefix)
    data = DataDir(tmp_path / "data")
    base = ["--data-dir", str(data.root), "--model", "tiny"]
    assert main(["add", *base, str(library)]) == 0  # FAISS, the default
    code, report = _run(["rebuild-index", *base, "--backend", "milvus", "--milvus-uri", milvus_uri, "--json"])
    assert code == 0 and report["backend"] == "milvus" and report["count"] == 2
    model_id, segments, dims = _state(data)
    with _collection(data, milvus_uri, model_id, dims) as milvus:
        assert milvus.ids().tolist() == segments
        with TokenStore(data.tokens_dir(model_id), int(dims[1]), int(dims[0]), readonly=True) as store:
            np.testing.assert_array_equal(milvus.tokens(segments), store.get_tokens(segments))
    code, report = _run(["verify", *base, "--backend", "milvus", "--milvus-uri", milvus_uri, "--json"])
    assert code == 0 and report["index_missing"] == [] and report["index_extra"] == []

    # Another rebuild of the model holds the lease: this one exits 2 at once, and changes nothing.
    import time

    from indexer.milvus_generations import NextRecord

    with _collection(data, milvus_uri, model_id, dims) as milvus:
        current = milvus.collection
        milvus.write_next_record(NextRecord("other-host:7:abc", time.time() + 60, ""))
    args = ["rebuild-index", *base, "--backend", "milvus", "--milvus-uri", milvus_uri]
    assert main(args) == 2
    assert "another `indexer rebuild-index` is rebuilding Milvus name" in capsys.readouterr().err
    with _collection(data, milvus_uri, model_id, dims) as milvus:
        assert milvus.collection == current and milvus.ids().tolist() == segments


def test_reindex_on_milvus_fills_the_new_collection_and_moves_the_alias(
    tmp_path: Path, library: Path, milvus_uri: str, milvus_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.checkpoint import load_model, save_checkpoint

    monkeypatch.setenv("TVS_MILVUS_PREFIX", milvus_prefix)
    data = DataDir(tmp_path / "data")
    base = ["--data-dir", str(data.root), "--backend", "milvus", "--milvus-uri", milvus_uri]
    assert main(["add", *base, "--model", "tiny", str(library)]) == 0
    old_id, old_segments, dims = _state(data)
    other = save_checkpoint(load_model("tiny"), tmp_path / "ckpt")
    code, report = _run(["reindex", *base, "--model", str(other), "--json"])
    assert code == 0 and report["switched"] and report["indexed"] == 2
    new_id, new_segments, _ = _state(data)
    assert new_id != old_id and len(new_segments) == 2
    with _collection(data, milvus_uri, new_id, dims) as new:
        assert new.ids().tolist() == new_segments
        # `<prefix>_active` now stands for the new model's generation: an alias on a server
        # (TVS_TEST_MILVUS_URI), a recorded pointer on Milvus Lite 2.5, which has no aliases.
        assert new.aliased() == new.collection == new.name + "_g1"
    with _collection(data, milvus_uri, old_id, dims) as old:
        assert old.ids().tolist() == old_segments, "the old generation is left as it was"
    assert _run(["verify", *base, "--model", str(other), "--json"])[0] == 0


@pytest.mark.parametrize("server", ["as served", "aliases emulated"])
def test_rebuild_index_fills_a_new_generation_while_searches_answer_from_the_old_one(
    tmp_path: Path,
    library: Path,
    milvus_uri: str,
    milvus_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    server: str,
) -> None:
    from helpers.milvus import AliasingClient, real_server_uri

    from indexer import milvus_index, milvus_sync

    if server == "aliases emulated":  # Milvus Lite made to act as a server with aliases, for every client
        if real_server_uri() is not None:
            pytest.skip("the server at TVS_TEST_MILVUS_URI has aliases of its own")
        connect = milvus_index.connect
        fake = AliasingClient(None)
        monkeypatch.setattr(milvus_index, "connect", lambda config, attempts=5: fake.another(connect(config)))
    monkeypatch.setenv("TVS_MILVUS_PREFIX", milvus_prefix)
    data = DataDir(tmp_path / "data")
    base = ["--data-dir", str(data.root), "--backend", "milvus", "--milvus-uri", milvus_uri]
    assert main(["add", *base, "--model", "tiny", str(library)]) == 0
    model_id, segments, dims = _state(data)
    query = np.ones((1, int(dims[0])), np.float32)
    with _collection(data, milvus_uri, model_id, dims) as reader:  # an API replica, say
        old = reader.collection
        before = reader.search(query, 5)[1]
        assert sorted(before[0][before[0] >= 0].tolist()) == segments
        seen = []
        copy = milvus_sync.copy_from_store

        def copy_then_search(index, *args, **kwargs):  # type: ignore[no-untyped-def]
            n = copy(index, *args, **kwargs)
            # Mid-rebuild: the new generation holds rows, the name still stands for the old one.
            seen.append((reader.collection, reader.size, reader.search(query, 5)[1].tolist()))
            return n

        monkeypatch.setattr(milvus_sync, "copy_from_store", copy_then_search)
        code, report = _run(["rebuild-index", *base, "--json"])
        assert code == 0 and report["count"] == 2 and report["collection"] != old, report
        assert seen and all(s == (old, 2, before.tolist()) for s in seen), seen
        assert (
            report["aliases"]
            is reader.generations.aliases
            is (server != "as served" or real_server_uri() is not None)
        )
        assert reader.collection == report["collection"] == report["name"] + "_g2"
        np.testing.assert_array_equal(reader.search(query, 5)[1], before)
        assert reader.generations.generations(reader._client, reader.name) == [report["collection"]]
    assert _run(["verify", *base, "--json"])[0] == 0
