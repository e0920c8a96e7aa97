"""POST /search through HTTP: validation, result fields, two-stage ordering, grouping, filters, batching."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from synth.media import write_pattern_video

TOP_K = 4  # the tiny preset's k


@pytest.fixture(
    scope="module",
    params=[
        ("sqlite", "faiss"),
        ("sqlite", "milvus"),
        pytest.param(("postgres", "faiss"), marks=pytest.mark.postgres),
    ],
    ids=lambda p: "-".join(p),
)
def library(
    request, new_database, launch, tmp_path_factory, clips, api, settings_for_backend
) -> Iterator[dict[str, Any]]:
    """A running app holding the 12 generated clips plus one 40 s video (three segments), on each catalog
    and each vector backend (FAISS in the process, Milvus)."""
    db, backend = request.param
    folder = tmp_path_factory.mktemp("search_lib")
    long_video = folder / "long.mp4"
    write_pattern_video(long_video, 40.0, 64, 64, 12)
    with launch(folder / "data", new_database(db), **settings_for_backend(request, backend)) as client:
        paths = [c["path"] for c in clips] + [long_video]
        titles = [c["caption"] for c in clips] + ["a long pattern video"]
        ids = api.ingest(client, paths, titles)
        yield {"client": client, "clip_ids": ids[:-1], "long_id": ids[-1], "captions": titles[:-1]}


def _search(library: dict[str, Any], query: str = "a red square moves left", **body: Any) -> Any:
    return library["client"].post("/search", json={"query": query, **body})


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"query": ""}, "query"),
        ({"query": "   \t "}, "the query is empty"),
        ({"query": "x" * 1001}, "1000"),
        ({"query": "dog", "limit": 0}, "limit"),
        ({"query": "dog", "limit": 101}, "limit"),
        ({"query": "dog", "limit": "many"}, "limit"),
        ({"query": "dog", "group_by": "frame"}, "group_by"),
        ({"query": "dog", "colour": "red"}, "colour"),
        ({}, "query"),
        ({"query": "dog", "filter": {"min_duration": 5, "max_duration": 1}}, "min_duration"),
        (
            {"query": "dog", "filter": {"created_after": "2030-01-01", "created_before": "2020-01-01"}},
            "created_after",
        ),
        ({"query": "dog", "filter": {"video_ids": "all"}}, "video_ids"),
    ],
)
def test_bad_search_requests_are_422_with_a_readable_message(library, body, needle):
    r = library["client"].post("/search", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["message"]
    assert isinstance(r.json()["detail"], list)


def test_query_of_exactly_1000_characters_is_accepted(library):
    assert _search(library, "a " * 500).status_code == 200


def test_results_carry_every_field(library):
    client = library["client"]
    r = _search(library, library["captions"][0], limit=5)
    assert r.status_code == 200, r.text
    body = r.json()
    health = client.get("/health").json()
    assert body["model"] == {"id": health["model"]["id"], "top_k": TOP_K, "reranked": True}
    assert set(body["timings_ms"]) >= {"encode", "faiss", "tokens", "rerank", "total", "queue"}
    assert all(v >= 0 for v in body["timings_ms"].values())
    assert body["timings_ms"]["encode"] > 0 and body["timings_ms"]["rerank"] > 0
    assert len(body["results"]) == 5
    for n, hit in enumerate(body["results"], start=1):
        assert hit["rank"] == n
        assert hit["start"] < hit["end"]
        assert hit["media_url"] == f"/videos/{hit['video_id']}/media#t={hit['start']:.3f},{hit['end']:.3f}"
        thumb = client.get(hit["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.content[:2] == b"\xff\xd8"
        if hit["delta"] is not None:
            assert hit["start"] <= hit["evidence_time"] <= hit["end"]
            assert math.isclose(hit["score"], hit["broad_score"] + hit["delta"], abs_tol=1e-5)
        assert hit["title"]


def test_reranked_top_k_come_first_and_the_rest_keep_broad_order(library):
    results = _search(library, limit=15).json()["results"]
    assert len(results) == 15  # 12 clips + 3 segments of the long video
    head, tail = results[:TOP_K], results[TOP_K:]
    assert all(h["delta"] is not None for h in head)
    assert {h["broad_rank"] for h in head} == set(range(1, TOP_K + 1))
    assert [h["score"] for h in head] == sorted((h["score"] for h in head), reverse=True)
    assert all(h["delta"] is None and h["evidence_time"] is None for h in tail)
    assert [h["broad_rank"] for h in tail] == list(range(TOP_K + 1, 16))
    broad = [h["broad_score"] for h in tail]
    assert broad == sorted(broad, reverse=True)


def test_without_rerank_the_broad_order_is_kept(library):
    body = _search(library, limit=15, rerank=False).json()
    assert body["model"]["reranked"] is False
    assert body["timings_ms"]["rerank"] == 0
    assert all(h["delta"] is None and h["broad_rank"] == h["rank"] for h in body["results"])
    assert all(h["score"] == h["broad_score"] for h in body["results"])


def test_limit_bounds_the_results(library):
    assert len(_search(library, limit=1).json()["results"]) == 1
    assert len(_search(library, limit=100).json()["results"]) == 15


def test_group_by_video_keeps_the_best_segment_per_video(library):
    by_segment = _search(library, limit=100).json()["results"]
    grouped = _search(library, limit=100, group_by="video").json()["results"]
    long_id = library["long_id"]
    assert sum(h["video_id"] == long_id for h in by_segment) == 3
    assert sum(h["video_id"] == long_id for h in grouped) == 1
    assert len({h["video_id"] for h in grouped}) == len(grouped) == 13
    best = next(h for h in by_segment if h["video_id"] == long_id)
    assert next(h for h in grouped if h["video_id"] == long_id)["segment_id"] == best["segment_id"]


def test_filter_by_video_ids(library):
    wanted = library["clip_ids"][3:5]
    results = _search(library, limit=100, filter={"video_ids": wanted}).json()["results"]
    assert {h["video_id"] for h in results} == set(wanted)
    assert _search(library, filter={"video_ids": [10**9]}).json()["results"] == []


def test_filter_by_duration_range(library):
    long_only = _search(library, limit=100, filter={"min_duration": 20}).json()["results"]
    assert {h["video_id"] for h in long_only} == {library["long_id"]} and len(long_only) == 3
    short = _search(library, limit=100, filter={"max_duration": 10}).json()["results"]
    assert {h["video_id"] for h in short} == set(library["clip_ids"])


def test_filter_by_creation_time(library):
    future = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    past = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    assert _search(library, filter={"created_after": future}).json()["results"] == []
    assert len(_search(library, limit=100, filter={"created_before": future}).json()["results"]) == 15
    window = {"created_after": past, "created_before": future}
    assert len(_search(library, limit=100, filter=window).json()["results"]) == 15


def test_filtered_rerank_uses_the_top_k_that_pass_the_filter(library):
    wanted = library["clip_ids"][:6]
    results = _search(library, limit=6, filter={"video_ids": wanted}).json()["results"]
    assert sorted(h["broad_rank"] for h in results) == list(range(1, 7))
    assert sum(h["delta"] is not None for h in results) == TOP_K


@pytest.mark.parametrize("vector_backend", ["faiss", "milvus"], indirect=True)
def test_empty_library_answers_200_with_no_results(service):
    with service() as client:
        r = client.post("/search", json={"query": "a red square moves left"})
        assert r.status_code == 200
        assert r.json()["results"] == []
        assert r.json()["model"]["reranked"] is False


def test_concurrent_queries_share_one_batch_and_get_the_same_answers(service, clips, api):
    queries = [c["caption"] for c in clips[:6]]
    with service(batch_max_size=8, batch_max_wait_ms=400) as client:
        api.ingest(client, [c["path"] for c in clips[:6]])
        alone = [client.post("/search", json={"query": q}).json() for q in queries]
        with ThreadPoolExecutor(len(queries)) as pool:
            together = list(pool.map(lambda q: client.post("/search", json={"query": q}).json(), queries))
    assert max(body["batch_size"] for body in together) > 1
    for a, b in zip(alone, together, strict=True):
        assert [h["segment_id"] for h in a["results"]] == [h["segment_id"] for h in b["results"]]
        for x, y in zip(a["results"], b["results"], strict=True):
            assert math.isclose(x["score"], y["score"], abs_tol=1e-4)
            assert x["evidence_time"] == y["evidence_time"]


def test_batching_off_answers_each_query_alone(service, clips, api):
    with service(batch_max_size=1) as client:
        api.ingest(client, [clips[0]["path"]])
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda _: client.post("/search", json={"query": "red"}).json(), range(4)))
    assert all(b["batch_size"] == 1 and len(b["results"]) == 1 for b in bodies)


def _broad(client, queries: list[str]) -> list[list[tuple[int, float]]]:
    out = []
    for q in queries:
        r = client.post("/search", json={"query": q, "limit": 10, "rerank": False})
        assert r.status_code == 200, r.text
        out.append([(h["segment_id"], h["broad_score"]) for h in r.json()["results"]])
    return out


@pytest.mark.gpu
def test_a_gpu_index_answers_like_the_cpu_one_follows_changes_and_saves_a_cpu_snapshot(
    new_database, launch, tmp_path, clips, api
):
    data, url = tmp_path / "data", new_database("sqlite")
    queries = ["a red square moves left", "a blue circle", "something green turning", "dog"]
    with launch(data, url, index_device="cpu") as client:
        first = api.ingest(client, [c["path"] for c in clips[:8]])
        assert client.get("/health").json()["index"]["device"] == "cpu"
        on_cpu = _broad(client, queries)
    with launch(data, url, index_device="cuda") as client:
        index = client.get("/health").json()["index"]
        assert index["device"] == "cuda:0" and index["device_reason"] is None, index
        assert 'tvs_index_info{device="cuda:0",factory="Flat"} 1.0' in client.get("/metrics").text
        on_gpu = _broad(client, queries)
        for cpu_hits, gpu_hits in zip(on_cpu, on_gpu, strict=True):
            assert [i for i, _ in gpu_hits] == [i for i, _ in cpu_hits]
            for (_, s_cpu), (_, s_gpu) in zip(cpu_hits, gpu_hits, strict=True):
                assert abs(s_cpu - s_gpu) < 2e-3  # the GPU copy stores fp16
        added = api.ingest(client, [clips[8]["path"]])  # the change follower adds to the GPU index
        assert client.delete(f"/videos/{first[0]}").status_code == 200
        api.wait_searchable(client, set(added))
        videos = {r["video_id"] for r in api.search(client, limit=100, rerank=False).json()["results"]}
        assert added[0] in videos and first[0] not in videos
        on_gpu = _broad(client, queries)
        size = client.get("/health").json()["index"]["size"]
    # Shutting down saved the snapshot from a CPU copy of the GPU index: a CPU process loads it as is.
    with launch(data, url, index_device="cpu") as client:
        index = client.get("/health").json()["index"]
        assert index["device"] == "cpu" and index["size"] == size
        assert [[i for i, _ in hits] for hits in _broad(client, queries)] == [
            [i for i, _ in hits] for hits in on_gpu
        ]
