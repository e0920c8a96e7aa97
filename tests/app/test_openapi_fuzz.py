"""Schemathesis over the OpenAPI schema: no 500s, no response outside the documented statuses and shapes."""

from __future__ import annotations

import ipaddress
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.deps import get_fetcher
from indexer.url_fetch import UrlFetcher

# The server runs private, as a real one with a key does: every request carries the key, and schemathesis's
# ignored_auth check sends wrong ones to see them refused.
KEY = "fuzz-key-" + "f" * 24
AUTH = {"X-API-Key": KEY}
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
        api_key=KEY,
    ) as base:
        import httpx

        # Some real rows, so ids that exist are found too.
        with open(clips[1]["path"], "rb") as f:
            assert httpx.post(f"{base}/videos", files={"file": ("a.mp4", f)}, headers=AUTH).status_code == 202
        yield base


def test_api_conforms_to_its_schema(fuzz_server: str) -> None:
    # Operations are enumerated at run time: the schema comes from the running server. (schemathesis's
    # pytest.from_fixture does not work with this pytest version.)
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        # Schema-valid cases and schema-invalid ones: the happy paths and the refusals.
        @hypothesis.given(
            case=operation.as_strategy() | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        )
        @hypothesis.settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: Any) -> None:
            response = case.call_and_validate(checks=CHECKS, headers=AUTH)
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        run()
    # The generator reached both the happy paths and the refusals.
    assert statuses["POST /search"] >= {200, 422}
    assert {202, 200} & statuses["POST /videos"] and 422 in statuses["POST /videos"]
    print(statuses)


def _schemathesis_cli(base: str, seed: int, report: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            f"--config-file={Path(__file__).with_name('schemathesis.toml')}",
            "run",
            f"{base}/openapi.json",
            "--phases=examples,coverage,fuzzing,stateful",
            "--max-examples=8",
            f"--seed={seed}",
            "--workers=1",
            "--request-timeout=20",
            "--suppress-health-check=all",
            "--no-color",
            f"--header=X-API-Key: {KEY}",
            f"--report-junit-path={report}",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=report.parent,  # schemathesis keeps a cache folder in its working directory
    )


@pytest.mark.parametrize("seed", [20261201, random.randrange(2**31)], ids=["fixed-seed", "random-seed"])
def test_schemathesis_every_phase(fuzz_server: str, seed: int, tmp_path: Path) -> None:
    # The outside fuzzer as a user runs it: every phase (examples, coverage, fuzzing, stateful) and every
    # check (all are on by default; tests/app/schemathesis.toml turns two off where they cannot apply) over the
    # whole API, bounded examples, a fixed seed and a fresh one (printed on failure).
    done = _schemathesis_cli(fuzz_server, seed, tmp_path / "junit.xml")
    assert done.returncode == 0, f"seed {seed}\n{done.stdout[-12000:]}\n{done.stderr[-3000:]}"
