"""A Milvus for tests: the server at TVS_TEST_MILVUS_URI, else one Milvus Lite server on a loopback port."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.ports import free_port

ENV = "TVS_TEST_MILVUS_URI"


def real_server_uri() -> str | None:
    return os.environ.get(ENV) or None


@contextmanager
def lite_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """Milvus Lite serving `folder/milvus.db` on 127.0.0.1:`port`, for every process of the test (gRPC over
    TCP, like a real server: a `.db` path would tie the file to the one process that opened it)."""
    from milvus_lite.server import Server

    port = port or free_port()
    server = Server(str(folder / "milvus.db"), address=f"127.0.0.1:{port}")
    if not server.init() or not server.start():
        raise RuntimeError(f"Milvus Lite did not start in {folder}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Milvus Lite did not open port {port} within 30 s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
