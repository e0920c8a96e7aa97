"""A replica started behind its change feed: /health answers 503 with the lag until it has caught up, and
/metrics exposes the lag."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, literal, select

from indexer.catalog import Change
from indexer.db import UTCDateTime, make_engine, utcnow

BACKLOG = (
    100_000  # change rows committed while the replica was down, an hour ago (a large reindex or cleanup)
)


def _backlog(db_url: str, model_id: str, rows: int) -> None:
    """Deletes of segments this replica never had: a replay that does nothing but read the feed. Generated
    by the database itself (a recursive CTE), so a large backlog costs the test little to write."""
    n = select(literal(1).label("i")).cte("n", recursive=True)
    n = n.union_all(select(n.c.i + 1).where(n.c.i < rows))
    an_hour_ago = literal(utcnow() - timedelta(hours=1), UTCDateTime())
    values = select(n.c.i + 10**9, literal(0), literal("delete"), literal(model_id), an_hour_ago)
    columns = ["segment_id", "video_id", "op", "model_id", "created_at"]
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(insert(Change).from_select(columns, values))
    finally:
        engine.dispose()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


def test_a_replica_behind_the_feed_is_not_ready_until_it_caught_up(
    launch, new_database, tmp_path: Path
) -> None:
    db_url, data = new_database("sqlite"), tmp_path / "data"
    with launch(data, db_url) as client:  # leaves a snapshot at seq 0 when it stops
        model_id = client.get("/health").json()["model"]["id"]
    _backlog(db_url, model_id, BACKLOG)

    with launch(data, db_url, feed_catch_up_s=0, max_feed_lag_s=2) as client:
        r = client.get("/health")
        metrics = client.get("/metrics").text
        assert r.status_code == 503, r.json()
        body = r.json()
        assert body["ready"] is False and body["status"] == "catching up with the change feed"
        feed = body["feed"]
        assert 0 < feed["lag_rows"] < BACKLOG and feed["lag_seconds"] > 3000 and feed["max_lag_seconds"] == 2
        assert feed["position"] < feed["head"] == BACKLOG
        assert _metric(metrics, "tvs_feed_lag_rows") > 0 and _metric(metrics, "tvs_feed_lag_seconds") > 3000
        assert client.post("/search", json={"query": "a red square"}).status_code == 200, (
            "it serves meanwhile"
        )

        deadline = time.monotonic() + 120
        while (r := client.get("/health")).status_code == 503 and time.monotonic() < deadline:
            assert r.json()["feed"]["lag_rows"] > 0
            time.sleep(0.05)
        assert r.status_code == 200, r.json()
        assert r.json()["status"] == "ok" and r.json()["ready"] is True
        assert r.json()["feed"] == {
            "position": BACKLOG,
            "head": BACKLOG,
            "lag_rows": 0,
            "lag_seconds": 0.0,
            "max_lag_seconds": 2.0,
        }
        metrics = client.get("/metrics").text
        assert _metric(metrics, "tvs_feed_lag_rows") == 0 and _metric(metrics, "tvs_feed_lag_seconds") == 0
