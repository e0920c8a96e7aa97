"""POST /search that can say no: min_score and the model's cut-off, page tokens, the meta filter."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from model.calibration import CALIBRATION_FILE, Calibration, Cutoff, write_calibration
from model.checkpoint import load_model, save_checkpoint

CAMERAS = ["gopro", "gopro", "gopro", "phone", "phone", "drone"]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def library(request, new_database, launch, tmp_path_factory, clips) -> Iterator[dict[str, Any]]:
    """The 12 generated clips; each video's meta names a camera (two a lens; `n` is a number)."""
    folder = tmp_path_factory.mktemp("nomatch_lib")
    # fp32: the paging test compares the order of two separate searches, and bf16 scores of two segments
    # can tie within its rounding and swap between runs (seen: 0.49901 against 0.49879).
    with launch(folder / "data", new_database(request.param), precision="fp32") as client:
        ids, metas = [], []
        for n, clip in enumerate(clips):
            meta: dict[str, Any] = {"camera": CAMERAS[n % len(CAMERAS)], "n": n}
            if n in (0, 3):
                meta["lens"] = "wide"
            metas.append(meta)
            with open(clip["path"], "rb") as f:
                r = client.post(
                    "/videos",
                    files={"file": (clip["path"].name, f, "video/mp4")},
                    data={"title": clip["caption"], "meta": json.dumps(meta)},
                )
            assert r.status_code == 202, r.text
            ids.append(r.json()["video_id"])
        for video_id in ids:
            job = client.get(f"/videos/{video_id}").json()["latest_job"]
            _wait(client, job["id"])
        _wait_indexed(client, ids)
        yield {"client": client, "ids": ids, "metas": metas, "captions": [c["caption"] for c in clips]}


def _wait(client, job_id: int) -> None:
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = client.get(f"/jobs/{job_id}").json()["state"]
        if state in ("ready", "failed"):
            assert state == "ready"
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def _wait_indexed(client, video_ids: list[int]) -> None:
    """Until the search index holds every segment of these videos.

    A job is `ready` once its rows commit; the serving index learns of them from the change feed, which
    its follower thread reads every `follow_interval_s`. Without this wait the first tests ran while the
    last video's segments were still arriving, so a search and the page walk after it could see two
    different libraries (a segment "appearing" in the walk, one item longer than the single search).
    """
    import time

    segments = sum(len(client.get(f"/videos/{v}").json()["segments"]) for v in video_ids)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.get("/health").json()["index"]["size"] == segments:
            return
        time.sleep(0.05)
    raise AssertionError(f"the index did not reach {segments} segments")


def _search(client, query: str = "a red square moves left", **body: Any) -> Any:
    return client.post("/search", json={"query": query, **body})


def _all_pages(client, **body: Any) -> list[dict[str, Any]]:
    pages = [_search(client, **body).json()]
    while pages[-1]["next_page_token"] is not None:
        r = _search(client, **body, page_token=pages[-1]["next_page_token"])
        assert r.status_code == 200, r.text
        pages.append(r.json())
    return pages


def _key(hit: dict[str, Any]) -> tuple[int, float]:
    return hit["segment_id"], round(hit["score"], 5)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rerank": False},
        {"group_by": "video"},
        {"filter": {"meta": {"camera": "gopro"}}, "group_by": "video"},
        {"min_score": 0.0},
    ],
)
def test_pages_walk_the_whole_ranking_once_in_order(library, options):
    client = library["client"]
    whole = _search(client, limit=100, **options).json()
    assert whole["next_page_token"] is None and whole["offset"] == 0
    pages = _all_pages(client, limit=5, **options)
    walked = [hit for page in pages for hit in page["results"]]
    assert [_key(h) for h in walked] == [_key(h) for h in whole["results"]]
    assert [h["rank"] for h in walked] == list(range(1, len(walked) + 1))
    assert [p["offset"] for p in pages] == list(range(0, 5 * len(pages), 5))
    assert all(len(p["results"]) == 5 for p in pages[:-1]) and 1 <= len(pages[-1]["results"]) <= 5
    assert len(pages) > 1


def test_a_token_works_with_another_page_size(library):
    client = library["client"]
    whole = _search(client, limit=100).json()["results"]
    first = _search(client, limit=3).json()
    second = _search(client, limit=7, page_token=first["next_page_token"]).json()
    assert [_key(h) for h in second["results"]] == [_key(h) for h in whole[3:10]]


@pytest.mark.parametrize(
    "change",
    [
        {"query": "a blue circle moves up"},
        {"rerank": False},
        {"group_by": "video"},
        {"filter": {"meta": {"camera": "phone"}}},
        {"min_score": 0.5},
    ],
)
def test_a_token_from_another_search_is_a_400(library, change):
    client = library["client"]
    token = _search(client, limit=2).json()["next_page_token"]
    body = {"query": "a red square moves left", "limit": 2, **change, "page_token": token}
    r = client.post("/search", json=body)
    assert r.status_code == 400, r.text
    assert "another search" in r.json()["detail"]


def _forge(token: str, **fields: Any) -> str:
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw = json.dumps({**data, **fields}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_garbage_page_tokens_are_400_never_500(library):
    client = library["client"]
    real = _search(client, limit=2).json()["next_page_token"]
    garbage = [
        "abc",
        "!!!!",
        "%%%",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
        base64.urlsafe_b64encode(b'{"v": 1}').decode(),
        _forge(real, o=-3),
        _forge(real, o=0),
        _forge(real, o="4"),
        _forge(real, o=True),
        _forge(real, o=2.5),
        _forge(real, v=2),
        _forge(real, extra=1),
        real[:-3],
    ]
    for token in garbage:
        r = _search(client, limit=2, page_token=token)
        assert r.status_code == 400, (token, r.text)
        assert "page_token" in r.json()["detail"]
    for bad in ("", "x" * 513, 5, ["a"]):
        r = _search(client, page_token=bad)
        assert r.status_code == 422, r.text
        assert "page_token" in r.json()["message"]


def test_paging_stops_at_the_depth_limit_with_a_clear_400(library):
    client = library["client"]
    real = _search(client, limit=2).json()["next_page_token"]
    r = _search(client, limit=2, page_token=_forge(real, o=1000))
    assert r.status_code == 400 and "past result 1000" in r.json()["detail"]
    # Just inside the limit the page is cut at result 1000 and offers no token past it.
    r = _search(client, limit=50, page_token=_forge(real, o=999))
    assert r.status_code == 200 and r.json()["next_page_token"] is None and r.json()["offset"] == 999


def test_min_score_drops_the_hits_below_it(library):
    client = library["client"]
    whole = _search(client, limit=100).json()["results"]
    scores = sorted(h["score"] for h in whole)
    cut = (scores[len(scores) // 2] + scores[len(scores) // 2 + 1]) / 2
    body = _search(client, limit=100, min_score=cut).json()
    assert body["cutoff"] == {"min_score": cut, "source": "request", "precision_target": None}
    assert body["no_good_match"] is False and body["best_guesses"] == []
    assert [_key(h) for h in body["results"]] == [_key(h) for h in whole if h["score"] >= cut]
    assert all(not h["below_threshold"] for h in body["results"])
    paged = _all_pages(client, limit=2, min_score=cut)
    assert [_key(h) for p in paged for h in p["results"]] == [_key(h) for h in body["results"]]


def test_nothing_above_min_score_is_no_good_match_with_the_best_guesses(library):
    client = library["client"]
    best = _search(client, limit=4).json()["results"]
    top = max(h["score"] for h in best)
    body = _search(client, limit=4, min_score=max(0.0, top) + 0.5).json()
    assert body["no_good_match"] is True
    assert body["results"] == [] and body["next_page_token"] is None
    assert [_key(h) for h in body["best_guesses"]] == [_key(h) for h in best]
    assert all(h["below_threshold"] for h in body["best_guesses"])
    assert [h["rank"] for h in body["best_guesses"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ('{"query": "dog", "min_score": -0.1}', "min_score"),
        ('{"query": "dog", "min_score": NaN}', "min_score"),
        ('{"query": "dog", "min_score": Infinity}', "min_score"),
        ('{"query": "dog", "min_score": 1e400}', "min_score"),
        ('{"query": "dog", "min_score": "high"}', "min_score"),
        ('{"query": "dog", "filter": {"meta": {"camera": 5}}}', "meta"),
        ('{"query": "dog", "filter": {"meta": {"camera": true}}}', "meta"),
        ('{"query": "dog", "filter": {"meta": {"camera": null}}}', "meta"),
        ('{"query": "dog", "filter": {"meta": {"camera": ["gopro"]}}}', "meta"),
        ('{"query": "dog", "filter": {"meta": {"camera": {"make": "gopro"}}}}', "meta"),
        ('{"query": "dog", "filter": {"meta": {"": "gopro"}}}', "meta"),
        ('{"query": "dog", "filter": {"meta": ["camera"]}}', "meta"),
        ('{"query": "dog", "filter": {"meta": "camera=gopro"}}', "meta"),
    ],
)
def test_hostile_min_score_and_meta_filters_are_422(library, raw, needle):
    r = library["client"].post("/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert needle in r.json()["message"]


def test_too_many_meta_keys_is_422(library):
    meta = {f"k{n}": "v" for n in range(21)}
    r = _search(library["client"], filter={"meta": meta})
    assert r.status_code == 422 and "meta" in r.json()["message"]


def test_filter_by_meta_keeps_the_videos_holding_every_pair(library):
    client, ids, metas = library["client"], library["ids"], library["metas"]

    def found(meta: dict[str, str], **body: Any) -> set[int]:
        r = _search(client, limit=100, filter={"meta": meta}, **body)
        assert r.status_code == 200, r.text
        return {h["video_id"] for h in r.json()["results"]}

    gopro = {i for i, m in zip(ids, metas, strict=True) if m["camera"] == "gopro"}
    assert found({"camera": "gopro"}) == gopro and len(gopro) == 6
    assert found({"camera": "gopro"}, rerank=False, group_by="video") == gopro
    wide_gopro = {i for i, m in zip(ids, metas, strict=True) if m["camera"] == "gopro" and m.get("lens")}
    assert found({"camera": "gopro", "lens": "wide"}) == wide_gopro and len(wide_gopro) == 1
    assert found({"camera": "tripod"}) == set()
    assert found({"n": "3"}) == set()  # stored as the number 3: strings never equal numbers
    assert found({"camera": "drone"}) == {
        i for i, m in zip(ids, metas, strict=True) if m["camera"] == "drone"
    }


def test_the_model_s_calibrated_cut_off_is_the_default_and_health_says_so(
    tmp_path, launch, new_database, clips, api
):
    checkpoint = tmp_path / "model"
    model = load_model("tiny")
    save_checkpoint(model, checkpoint)
    db = new_database("sqlite")
    with launch(tmp_path / "data", db, model=str(checkpoint)) as client:
        cutoff = client.get("/health").json()["model"]["cutoff"]
        assert cutoff["min_score"] is None and CALIBRATION_FILE in cutoff["note"]
        api.ingest(client, [c["path"] for c in clips[:4]])
        body = _search(client, limit=4).json()
        assert body["cutoff"]["source"] == "none" and body["no_good_match"] is False
        top = max(h["score"] for h in body["results"])
    loaded = load_model(str(checkpoint))
    calibration = Calibration(
        precision_target=0.9,
        cutoffs={
            "two_stage": Cutoff(min_score=max(0.0, top) + 0.25, precision=0.9, coverage=0.1),
            "broad": Cutoff(min_score=None, precision=None, coverage=0.0),
        },
        queries=7,
        videos=7,
        model_id=loaded.model_id,
        top_k=4,
        dtype="float32",
        created_at="2026-12-01T00:00:00+00:00",
        validation_set="a test",
    )
    write_calibration(checkpoint, calibration)
    with launch(tmp_path / "data", db, model=str(checkpoint)) as client:
        cutoff = client.get("/health").json()["model"]["cutoff"]
        assert cutoff["min_score"] == calibration.min_score("two_stage")
        assert cutoff["broad_min_score"] is None and cutoff["precision_target"] == 0.9
        assert cutoff["validation_queries"] == 7 and "precision 0.9" in cutoff["note"]
        body = _search(client, limit=4).json()
        assert body["cutoff"] == {
            "min_score": calibration.min_score("two_stage"),
            "source": "model",
            "precision_target": 0.9,
        }
        assert body["no_good_match"] is True and len(body["best_guesses"]) == 4
        # No broad cut-off was calibrated, so a search without the focused view keeps every hit.
        broad = _search(client, limit=4, rerank=False).json()
        assert broad["cutoff"]["source"] == "none" and len(broad["results"]) == 4
        # The request's own min_score wins over the model's.
        mine = _search(client, limit=4, min_score=0).json()
        assert mine["cutoff"] == {"min_score": 0.0, "source": "request", "precision_target": None}
        assert mine["no_good_match"] is (top < 0)
    write_calibration(checkpoint, replace(calibration, model_id="small-000000000000"))
    with launch(tmp_path / "data", db, model=str(checkpoint)) as client:
        cutoff = client.get("/health").json()["model"]["cutoff"]
        assert cutoff["min_score"] is None and "small-000000000000" in cutoff["note"]
        assert _search(client, limit=4).json()["cutoff"]["source"] == "none"


def test_the_openapi_schema_documents_every_new_field(library):
    spec = library["client"].get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    documented = {
        "SearchRequest": ["min_score", "page_token"],
        "SearchFilterIn": ["meta"],
        "SearchResponse": ["results", "no_good_match", "best_guesses", "cutoff", "offset", "next_page_token"],
        "SearchHit": ["below_threshold"],
        "CutoffInfo": ["min_score", "source", "precision_target"],
        "HealthCutoff": [
            "min_score",
            "broad_min_score",
            "precision_target",
            "validation_queries",
            "calibrated_at",
            "note",
        ],
    }
    for name, fields in documented.items():
        for field in fields:
            assert schemas[name]["properties"][field].get("description"), (name, field)
    assert "400" in spec["paths"]["/search"]["post"]["responses"]
