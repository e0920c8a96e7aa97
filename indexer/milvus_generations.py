"""Which collection a model's Milvus name stands for: a generation behind an alias, or behind a pointer.

A model's searchable name (`milvus_schema.collection_name(prefix, model_id)`) holds no rows itself: it
names the complete generation `<name>_g<N>`. `indexer rebuild-index` fills `<name>_g<N+1>` beside it
while searches keep reading generation N, moves the name in one call and then drops generation N.

On a server with collection aliases the name is an alias (`alter_alias` moves it; the server resolves it
on every call). Milvus Lite 2.5 answers every alias call (and `rename_collection`) with gRPC
UNIMPLEMENTED; there the name is a row in a small metadata collection, `<prefix>_generations`
(name -> collection), that readers look up and cache for a second. Which of the two a server gets is
decided once per client by `probe` (one `list_aliases` call), and every method here asks it: the two
kinds of server run the same steps, with one branch each where they differ.

While `indexer rebuild-index` fills a generation, the meta collection also holds a **next record** under
`<name>.next` (on both kinds of server): the rebuild's owner, its lease expiry (unix time) and the
generation being filled, as JSON in the `target` field. Writers read it (indexer.milvus_index) and write to
that generation too; a second rebuild finds it and refuses while the lease is live
(indexer.milvus_rebuild_lease).

A library written before generations (one collection named like the model) is taken over on first
open: with aliases the collection is renamed to `<name>_g1` and the alias created; without, the pointer
records the old collection itself as the current generation (generation 0).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

NAME, TARGET, _VEC = "name", "target", "v"
_NAME_MAX = 255  # Milvus's limit on collection and alias names


def unimplemented(error: BaseException) -> bool:
    """Whether a client error says the server lacks the call (Milvus Lite 2.5: gRPC UNIMPLEMENTED)."""
    return "UNIMPLEMENTED" in str(error).upper()


def not_found(error: BaseException) -> bool:
    """Whether a client error says the collection is not there (dropped after a switch, say)."""
    text = str(error).lower()
    return "collection not found" in text or "can't find collection" in text or "not exist" in text


@dataclass(frozen=True)
class NextRecord:
    """A rebuild in progress: who runs it, until when its lease holds, what it fills ('' until created)."""

    owner: str
    expires: float  # unix time: past it, another rebuild may take over
    collection: str = ""


def next_key(name: str) -> str:
    """The meta row of `name`'s next record (a dot: never a collection's or an alias's name)."""
    return f"{name}.next"


class Generations:
    """Resolve, create and move a model's name; `aliases` is the probe's answer (None until asked)."""

    def __init__(self, prefix: str, timeout_s: float) -> None:
        self.meta = f"{prefix}_generations"
        self.timeout_s = timeout_s
        self.aliases: bool | None = None
        self._meta_ready = False

    def probe(self, client: Any) -> bool:
        """True where the server has collection aliases; asked once, then remembered."""
        if self.aliases is None:
            try:
                client.list_aliases(timeout=self.timeout_s)
                self.aliases = True
            except Exception as e:
                if not unimplemented(e):
                    raise
                self.aliases = False
                logger.info("Milvus has no collection aliases: generations are recorded in %s", self.meta)
        return self.aliases

    # --- reading --------------------------------------------------------------------------------------
    def current(self, client: Any, name: str) -> str | None:
        """The collection `name` stands for now, or None (nothing recorded yet)."""
        if self.probe(client):
            if name not in client.list_aliases(timeout=self.timeout_s).get("aliases", []):
                return None
            return str(client.describe_alias(name, timeout=self.timeout_s)["collection_name"])
        self._ensure_meta(client)
        rows = client.query(
            self.meta, filter=f'{NAME} == "{name}"', output_fields=[TARGET], timeout=self.timeout_s
        )
        return str(rows[0][TARGET]) if rows else None

    def generations(self, client: Any, name: str) -> list[str]:
        """The collections that are generations of `name` (a pre-generation collection counts as 0), oldest
        first."""
        pattern = re.compile(rf"{re.escape(name)}(?:_g(\d+))?")
        found = [
            (int(m.group(1) or 0), str(c))
            for c in client.list_collections(timeout=self.timeout_s)
            if (m := pattern.fullmatch(str(c)))
        ]
        return [c for _, c in sorted(found)]

    def next_generation(self, client: Any, name: str) -> str:
        """A name for the generation after every existing one (a half-filled leftover included)."""
        gens = self.generations(client, name)
        last = max((int(c.rsplit("_g", 1)[1]) for c in gens if c != name), default=0)
        out = f"{name}_g{last + 1}"
        if len(out) > _NAME_MAX:
            raise ValueError(f"Milvus name {out!r} is longer than {_NAME_MAX} characters")
        return out

    # --- writing --------------------------------------------------------------------------------------
    def point(self, client: Any, name: str, collection: str) -> None:
        """Make `name` stand for `collection` (one call: readers see the old one or the new one)."""
        if self.probe(client):
            if name in client.list_aliases(timeout=self.timeout_s).get("aliases", []):
                client.alter_alias(collection, name, timeout=self.timeout_s)
            else:
                client.create_alias(collection, name, timeout=self.timeout_s)
            return
        self._ensure_meta(client)
        row = {NAME: name, TARGET: collection, _VEC: [0.0, 0.0]}
        client.upsert(self.meta, [row], timeout=self.timeout_s)

    def forget(self, client: Any, name: str) -> None:
        """`name` stands for nothing any more (before its collections are dropped)."""
        if self.probe(client):
            if name in client.list_aliases(timeout=self.timeout_s).get("aliases", []):
                client.drop_alias(name, timeout=self.timeout_s)
            return
        self._ensure_meta(client)
        client.delete(self.meta, filter=f'{NAME} == "{name}"', timeout=self.timeout_s)

    def adopt_legacy(self, client: Any, name: str) -> str | None:
        """Take over a collection written before generations (named `name` itself); its new name, or None
        where there is none."""
        if not client.has_collection(name, timeout=self.timeout_s):
            return None
        if self.probe(client):
            # An alias cannot share a collection's name: the collection moves to generation 1 first.
            target = f"{name}_g1"
            client.rename_collection(name, target, timeout=self.timeout_s)
        else:
            target = name
        self.point(client, name, target)
        logger.info("Milvus collection %s is now generation %s of %s", name, target, name)
        return target

    # --- the next record (a rebuild in progress) ---------------------------------------------------------
    def read_next(self, client: Any, name: str) -> NextRecord | None:
        """The rebuild in progress on `name`, or None."""
        self._ensure_meta(client)
        key = next_key(name)
        rows = client.query(
            self.meta, filter=f'{NAME} == "{key}"', output_fields=[TARGET], timeout=self.timeout_s
        )
        if not rows:
            return None
        fields = json.loads(str(rows[0][TARGET]))
        return NextRecord(str(fields["owner"]), float(fields["expires"]), str(fields.get("collection", "")))

    def write_next(self, client: Any, name: str, record: NextRecord) -> None:
        self._ensure_meta(client)
        text = json.dumps(asdict(record), separators=(",", ":"))
        if len(text) > _NAME_MAX:
            raise ValueError(f"next record {text!r} is longer than {_NAME_MAX} characters")
        client.upsert(
            self.meta, [{NAME: next_key(name), TARGET: text, _VEC: [0.0, 0.0]}], timeout=self.timeout_s
        )

    def clear_next(self, client: Any, name: str) -> None:
        self._ensure_meta(client)
        client.delete(self.meta, filter=f'{NAME} == "{next_key(name)}"', timeout=self.timeout_s)

    def _ensure_meta(self, client: Any) -> None:
        if self._meta_ready:
            return
        if not client.has_collection(self.meta, timeout=self.timeout_s):
            from pymilvus import DataType

            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field(NAME, DataType.VARCHAR, is_primary=True, max_length=_NAME_MAX)
            schema.add_field(TARGET, DataType.VARCHAR, max_length=_NAME_MAX)
            schema.add_field(_VEC, DataType.FLOAT_VECTOR, dim=2)  # Milvus wants one vector field; never read
            params = client.prepare_index_params()
            params.add_index(field_name=_VEC, index_type="FLAT", metric_type="L2", params={})
            try:
                client.create_collection(
                    self.meta,
                    schema=schema,
                    index_params=params,
                    consistency_level="Strong",
                    timeout=self.timeout_s,
                )
            except Exception:
                # Another process may have created it first.
                if not client.has_collection(self.meta, timeout=self.timeout_s):
                    raise
        self._meta_ready = True
