"""The Milvus backend through its public methods: exact parity with FAISS Flat, tokens, filters, deletes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pytest

from indexer.milvus_index import POINTER_TTL_S, MilvusIndex
from indexer.milvus_schema import (
    MilvusConfig,
    MilvusIndexSpecError,
    MilvusUnavailableError,
    SegmentRow,
    collection_name,
    connect,
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


def test_capabilities_are_probed_once_and_tokens_come_back_either_way(index: MilvusIndex) -> None:
    """Milvus Lite 2.5.1 has no aliases and cannot return fp16 fields with search hits; a real server
    (TVS_TEST_MILVUS_URI) has both. The same calls give the same answers on each."""
    from helpers.milvus import real_server_uri

    server = real_server_uri() is not None
    rng = np.random.default_rng(3)
    cls = rng.standard_normal((20, D)).astype(np.float32)
    tokens = rng.standard_normal((20, T, D)).astype(np.float16)
    index.add(_rows(20), cls, tokens)
    assert index.generations.aliases is server
    assert index.tokens_in_search is None, "not tried before the first search"
    _, ids = index.search(cls[:2], 5)
    assert index.tokens_in_search is server
    np.testing.assert_array_equal(index.tokens(ids[0]), tokens[ids[0] - 1])
    _, ids = index.search(cls[2:3], 5)  # remembered: no second probe
    np.testing.assert_array_equal(index.tokens(ids[0]), tokens[ids[0] - 1])


class FakeClient:
    """Just search and get, counting calls; `tokens_in_hits` says whether hits carry their tokens."""

    def __init__(self, tokens: np.ndarray, tokens_in_hits: bool) -> None:
        self.tokens, self.tokens_in_hits, self.calls = tokens, tokens_in_hits, []

    def search(self, name, data, limit, output_fields, **kw):
        self.calls.append(("search", tuple(output_fields)))
        with_tokens = "tokens" in output_fields and self.tokens_in_hits
        return [
            [
                {"id": i, "distance": 1.0 - 0.01 * i, "entity": {"tokens": self.tokens[i - 1].tobytes()} if with_tokens else {}}
                for i in range(1, limit + 1)
            ]
            for _ in data
        ]  # fmt: skip

    def get(self, name, ids, output_fields, **kw):
        self.calls.append(("get", tuple(output_fields)))
        return [{"id": i, "tokens": self.tokens[i - 1].tobytes()} for i in ids]


@pytest.mark.parametrize("tokens_in_hits", [True, False])
def test_search_brings_the_tokens_in_one_round_trip_where_the_server_can(tokens_in_hits: bool) -> None:
    tokens = np.random.default_rng(4).standard_normal((40, T, D)).astype(np.float16)
    client = FakeClient(tokens, tokens_in_hits)
    index = MilvusIndex(MilvusConfig("http://fake:19530"), "m", D, T)
    index._client, index.generations.aliases = client, True  # a server with aliases: no lookups
    for n in range(2):
        _, ids = index.search(np.ones((2, D), np.float32), 10)
        np.testing.assert_array_equal(index.tokens(ids.ravel()[::-1]), tokens[ids.ravel()[::-1] - 1])
        if n == 0:
            index._cache.clear()  # the second round must not be served by the first one's tokens
    assert index.tokens_in_search is tokens_in_hits
    if tokens_in_hits:  # one call per search: hits and tokens together
        assert client.calls == [("search", ("tokens",))] * 2
    else:  # the first search asks for tokens and learns they do not come; then search + one get each
        assert client.calls == [
            ("search", ("tokens",)),
            ("get", ("tokens",)),
            ("search", ()),
            ("get", ("tokens",)),
        ]


@pytest.fixture(params=["as served", "aliases emulated"])
def served(
    request: pytest.FixtureRequest, milvus_uri: str, milvus_prefix: str
) -> Iterator[Callable[..., MilvusIndex]]:
    """Opens MilvusIndexes on the test server as it is, and (Milvus Lite) on the same server made to act as
    one with aliases (helpers.milvus.AliasingClient), so both branches of the generations run."""
    from helpers.milvus import AliasingClient, real_server_uri

    config = MilvusConfig(milvus_uri, prefix=milvus_prefix)
    if request.param == "aliases emulated" and real_server_uri() is not None:
        pytest.skip("the server at TVS_TEST_MILVUS_URI has aliases of its own")
    fake = AliasingClient(connect(config)) if request.param == "aliases emulated" else None
    opened: list[MilvusIndex] = []

    def open_index(model_id: str = "tiny/model:1", *, create: bool = True) -> MilvusIndex:
        index = MilvusIndex(config, model_id, D, T)
        if fake is not None:
            index._client = fake.another(connect(config))
        opened.append(index.open(create=create))
        return index

    open_index.expect_aliases = fake is not None or real_server_uri() is not None  # type: ignore[attr-defined]
    yield open_index
    for index in opened:
        index.close()
    if fake is not None:
        fake.close()


def test_a_new_generation_fills_while_searches_read_the_old_one(served: Callable[..., MilvusIndex]) -> None:
    index = served()
    reader = served(create=False)  # another replica
    assert index.generations.aliases is reader.generations.aliases is served.expect_aliases  # type: ignore[attr-defined]
    rng = np.random.default_rng(5)
    cls = rng.standard_normal((40, D)).astype(np.float32)
    tokens = rng.standard_normal((40, T, D)).astype(np.float16)
    rows = _rows(40)
    index.add(rows[:20], cls[:20], tokens[:20])
    old = index.collection
    assert old == index.name + "_g1"
    q = cls[:3]
    before = index.search(q, 10)
    new = index.new_generation()
    assert new == index.name + "_g2" and index.collection == old
    index.add(rows[20:30], cls[20:30], tokens[20:30], collection=new)  # half filled
    for idx in (index, reader):
        np.testing.assert_array_equal(idx.search(q, 10)[1], before[1])
        assert idx.size == 20
    rest = rows[:20] + rows[30:]
    index.add(
        rest, np.concatenate([cls[:20], cls[30:]]), np.concatenate([tokens[:20], tokens[30:]]), collection=new
    )
    assert index.switch_to(new) == [old]
    assert index.collection == reader.collection == new
    time.sleep(POINTER_TTL_S)  # a reader without aliases trusts its pointer this long
    for idx in (index, reader):
        assert idx.size == 40
        np.testing.assert_array_equal(idx.ids(), np.arange(1, 41))
        np.testing.assert_array_equal(idx.tokens([35]), tokens[[34]])
    assert index.generations.generations(index._client, index.name) == [new]
    index.drop()
    assert index.generations.generations(index._client, index.name) == []


def test_a_collection_from_before_generations_is_adopted_on_first_open(
    served: Callable[..., MilvusIndex],
) -> None:
    legacy = served("old/model", create=False)
    aliases = legacy.generations.aliases
    legacy._create(legacy._client, legacy.name)  # what the single-collection version made
    rng = np.random.default_rng(6)
    cls = rng.standard_normal((10, D)).astype(np.float32)
    tokens = rng.standard_normal((10, T, D)).astype(np.float16)
    legacy.add(_rows(10), cls, tokens, collection=legacy.name)  # as the old code wrote: to the name itself
    index = served("old/model")
    try:
        # With aliases the collection moves to generation 1 and the name becomes an alias; without, the
        # pointer records the collection as it is (generation 0).
        assert index.collection == (index.name + "_g1" if aliases else index.name)
        np.testing.assert_array_equal(index.ids(), np.arange(1, 11))
        np.testing.assert_array_equal(index.search(cls[:1], 1)[1], [[1]])
        new = index.new_generation()
        assert new == index.name + ("_g2" if aliases else "_g1")
        index.add(_rows(10), cls, tokens, collection=new)
        index.switch_to(new)
        assert index.generations.generations(index._client, index.name) == [new]
        np.testing.assert_array_equal(index.tokens([4]), tokens[[3]])
    finally:
        index.drop()
