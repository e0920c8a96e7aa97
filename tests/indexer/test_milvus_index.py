"""The Milvus backend through its public methods: exact parity with FAISS Flat, tokens, filters, deletes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pytest

from indexer.milvus_index import (
    MilvusConfig,
    MilvusIndex,
    MilvusIndexSpecError,
    MilvusUnavailableError,
    SegmentRow,
    collection_name,
    parse_index_spec,
)
from indexer.token_store import MissingRecordError
from indexer.vector_index import VectorIndex

D, T = 32, 4
T0 = datetime(2026, 1, 1)


@dataclass(frozen=True)
class Filter:
    video_ids: frozenset[int] | None = None
    min_duration_s: float | None = None
    max_duration_s: float | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


def _rows(n: int, per_video: int = 10) -> list[SegmentRow]:
    return [
        SegmentRow(i + 1, i // per_video, float(i % per_video), float(i % per_video) + 1.0,
                   T0 + timedelta(hours=i // per_video), float(10 * (i // per_video % 7)))
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def index(milvus_uri: str, milvus_prefix: str):
    with MilvusIndex(MilvusConfig(milvus_uri, prefix=milvus_prefix), "tiny/model:1", D, T) as idx:
        yield idx
        idx.drop()


@pytest.mark.slow
def test_top10_equals_faiss_flat_on_10k_segments(index: MilvusIndex) -> None:
    rng = np.random.default_rng(0)
    n = 10_000
    cls = rng.standard_normal((n, D)).astype(np.float32)
    tokens = rng.standard_normal((n, T, D)).astype(np.float16)
    rows = _rows(n)
    for s in range(0, n, 2500):
        index.add(rows[s : s + 2500], cls[s : s + 2500], tokens[s : s + 2500])
    flat = VectorIndex(D, "Flat")
    flat.add(np.arange(1, n + 1), cls)
    queries = rng.standard_normal((50, D)).astype(np.float32)
    f_scores, f_ids = flat.search(queries, 10)
    m_scores, m_ids = index.search(queries, 10)
    assert index.size == n
    np.testing.assert_array_equal(m_ids, f_ids)
    np.testing.assert_allclose(m_scores, f_scores, atol=1e-4)


def test_tokens_round_trip_and_deletes_leave_search(index: MilvusIndex) -> None:
    rng = np.random.default_rng(1)
    cls = rng.standard_normal((30, D)).astype(np.float32)
    tokens = rng.standard_normal((30, T, D)).astype(np.float16)
    index.add(_rows(30), cls, tokens)
    np.testing.assert_array_equal(index.tokens([3, 1]), tokens[[2, 0]])
    _, ids = index.search(cls[4:5], 1)
    assert ids[0, 0] == 5
    index.delete([5])
    _, ids = index.search(cls[4:5], 30)
    assert 5 not in ids[0] and (ids[0] >= 0).sum() == 29
    with pytest.raises(MissingRecordError) as e:
        index.tokens([7, 5])
    assert e.value.ids == [5]
    index.add(_rows(30)[:3], cls[:3], tokens[:3])  # the same ids again: an upsert, not a duplicate
    assert index.size == 29
    np.testing.assert_array_equal(index.ids(), [i for i in range(1, 31) if i != 5])


def test_filters_are_pushed_down(index: MilvusIndex) -> None:
    rng = np.random.default_rng(2)
    n = 200
    rows = _rows(n)
    cls = rng.standard_normal((n, D)).astype(np.float32)
    index.add(rows, cls, rng.standard_normal((n, T, D)).astype(np.float16))
    q = rng.standard_normal((3, D)).astype(np.float32)
    filters = [
        Filter(video_ids=frozenset({2, 5})),
        Filter(min_duration_s=25.0, max_duration_s=45.0, created_after=T0 + timedelta(hours=3)),
        None,
    ]
    scores, ids = index.search(q, 15, filters)
    by_id = {r.id: r for r in rows}
    assert all(by_id[int(i)].video_id in {2, 5} for i in ids[0] if i >= 0)
    assert (ids[0] >= 0).sum() == 15  # 20 segments match: the filter did not cost results
    second = [by_id[int(i)] for i in ids[1] if i >= 0]
    assert len(second) == 15
    assert all(25.0 <= r.duration_s <= 45.0 and r.created_at > T0 + timedelta(hours=3) for r in second)
    expected = np.argsort(-(cls / np.linalg.norm(cls, axis=1, keepdims=True)) @ q[2])[:15] + 1
    np.testing.assert_array_equal(ids[2], expected)
    assert np.all(np.diff(scores[2]) <= 1e-6)


def test_unreachable_server_is_a_clear_error(milvus_prefix: str) -> None:
    from helpers.ports import free_port

    config = MilvusConfig(f"http://127.0.0.1:{free_port()}", prefix=milvus_prefix, timeout_s=1.0)
    with pytest.raises(MilvusUnavailableError, match="cannot reach Milvus at http://127.0.0.1"):
        MilvusIndex(config, "m", D, T).open()


def test_index_spec_and_collection_names() -> None:
    assert parse_index_spec("FLAT") == ("FLAT", {}, {})
    assert parse_index_spec("IVF_FLAT:nlist=128,nprobe=8") == ("IVF_FLAT", {"nlist": 128}, {"nprobe": 8})
    with pytest.raises(MilvusIndexSpecError, match="expected an index type"):
        parse_index_spec("ivf flat")
    with pytest.raises(MilvusIndexSpecError, match="is not key=value"):
        parse_index_spec("IVF_FLAT:nlist")
    a, b = collection_name("tvs", "ViT-B-32:openai"), collection_name("tvs", "ViT-B-32/openai")
    assert a != b and a.startswith("tvs_ViT_B_32_openai_")
