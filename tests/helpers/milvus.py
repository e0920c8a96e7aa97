"""A Milvus for tests: the server at TVS_TEST_MILVUS_URI, else one Milvus Lite server on a loopback port."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


class AliasingClient:
    """A MilvusClient for Milvus Lite that acts like a server with collection aliases and
    `rename_collection` (kept in this object, not in Milvus), so the alias branch of
    indexer.milvus_generations runs against real rows where no real server is at hand. Share one object
    between the indexes that stand for processes on the same server."""

    def __init__(self, client: Any) -> None:
        self._c = client
        self.alias_map: dict[str, str] = {}  # alias -> collection (as this fake server names it)
        self.renamed: dict[str, str] = {}  # collection -> the Lite collection holding it
        self.calls: list[str] = []

    def another(self, client: Any) -> AliasingClient:
        """A second connection to the same fake server (another process, say)."""
        other = AliasingClient(client)
        other.alias_map, other.renamed, other.calls = self.alias_map, self.renamed, self.calls
        return other

    def _physical(self, name: str) -> str:
        name = self.alias_map.get(name, name)
        return self.renamed.get(name, name)

    def list_aliases(self, collection_name: str = "", timeout: float | None = None) -> dict[str, Any]:
        self.calls.append("list_aliases")
        return {"aliases": sorted(self.alias_map)}

    def describe_alias(self, alias: str, timeout: float | None = None) -> dict[str, Any]:
        return {"alias": alias, "collection_name": self.alias_map[alias]}

    def create_alias(self, collection_name: str, alias: str, timeout: float | None = None) -> None:
        if alias in self.alias_map or alias in self.list_collections():
            raise RuntimeError(f"alias {alias} already exists or is a collection's name")
        self.alias_map[alias] = collection_name
        self.calls.append("create_alias")

    def alter_alias(self, collection_name: str, alias: str, timeout: float | None = None) -> None:
        if alias not in self.alias_map:
            raise RuntimeError(f"alias {alias} does not exist")
        self.alias_map[alias] = collection_name
        self.calls.append("alter_alias")

    def drop_alias(self, alias: str, timeout: float | None = None) -> None:
        del self.alias_map[alias]

    def rename_collection(self, old_name: str, new_name: str, timeout: float | None = None) -> None:
        self.renamed[new_name] = self._physical(old_name)
        self.renamed.pop(old_name, None)
        self.calls.append("rename_collection")

    def list_collections(self, **kwargs: Any) -> list[str]:
        hidden = set(self.renamed.values())
        return [c for c in self._c.list_collections(**kwargs) if c not in hidden] + list(self.renamed)

    def has_collection(self, name: str, timeout: float | None = None) -> bool:
        return name in self.list_collections()

    def drop_collection(self, name: str, timeout: float | None = None) -> None:
        if name in self.alias_map.values():
            raise RuntimeError(f"collection {name} still has an alias")  # as a server refuses
        self._c.drop_collection(self._physical(name), timeout=timeout)
        self.renamed.pop(name, None)

    def __getattr__(self, attr: str) -> Any:
        method = getattr(self._c, attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], str):  # search, query, get, upsert, delete, create_collection...
                args = (self._physical(args[0]), *args[1:])
            return method(*args, **kwargs)

        return call
