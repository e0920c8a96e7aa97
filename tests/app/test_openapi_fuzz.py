"""Schemathesis over the OpenAPI schema: no 500s, no response outside the documented statuses and shapes."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.deps import get_fetcher
from indexer.url_fetch import UrlFetcher

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


async def _loopback(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    # No real DNS while fuzzing: every generated host "resolves" to loopback and is refused (403).
    return [ipaddress.ip_address("127.0.0.1")]


@pytest.fixture(scope="module")
def fuzz_server(new_database, serve, tmp_path_factory, clips, api) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    root = folder / "library"
    root.mkdir()
    (root / "clip.mp4").write_bytes(clips[0]["path"].read_bytes())
    fetcher = UrlFetcher(resolver=_loopback)
    # Worker off: generated "videos" are random bytes; decoding them is tested elsewhere.
    with serve(
        folder / "data",
        new_database("sqlite"),
        dependency_overrides={get_fetcher: lambda: fetcher},
        worker=False,
        allowed_roots=[root],
        max_upload_bytes=64 * 1024,
    ) as base:
        import httpx

        # Some real rows, so ids that exist are found too.
        with open(clips[1]["path"], "rb") as f:
            assert httpx.post(f"{base}/videos", files={"file": ("a.mp4", f)}).status_code == 202
        yield base


def test_api_conforms_to_its_schema(fuzz_server: str) -> None:
    # Operations are enumerated at run time: the schema comes from the running server. (schemathesis's
    # pytest.from_fixture does not work with this pytest version.)
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=20,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: Any) -> None:
            response = case.call_and_validate(checks=CHECKS)
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        run()
    # The generator reached both the happy paths and the refusals.
    assert statuses["POST /search"] >= {200, 422}
    assert {202, 200} & statuses["POST /videos"] and 422 in statuses["POST /videos"]
    print(statuses)
