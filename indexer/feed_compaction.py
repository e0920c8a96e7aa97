"""Pruning the change feed: a model's changes its snapshot on disk covers, once older than the retention window."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from indexer.catalog import Change, EmbeddingModel, FeedHorizon
from indexer.changes import feed_horizon
from indexer.db import session_scope, utcnow
from indexer.paths import DataDir

logger = logging.getLogger(__name__)

# A replica that is behind by less than this follows on without reloading its index, and a transaction
# open this long still finds its change rows kept when it commits (docs/reliability.md).
DEFAULT_RETENTION_S = 600.0  # TVS_FEED_RETENTION_S (indexer.settings)


@dataclass(frozen=True)
class ModelCompaction:
    """One model's feed after pruning: `horizon` is the seq it is pruned through (0: never pruned)."""

    model_id: str
    snapshot_seq: int | None  # the seq its snapshot on disk covers; None: no snapshot, nothing pruned
    pruned: int
    horizon: int
    kept: int


@dataclass
class CompactReport:
    retention_s: float
    models: list[ModelCompaction] = field(default_factory=list)

    @property
    def pruned(self) -> int:
        return sum(m.pruned for m in self.models)

    def to_dict(self) -> dict[str, object]:
        return {
            "retention_s": self.retention_s,
            "pruned": self.pruned,
            "models": [asdict(m) for m in self.models],
        }


def prune_model(
    session_factory: sessionmaker[Session],
    model_id: str,
    covered_seq: int,
    retention_s: float,
    *,
    now: datetime | None = None,
) -> ModelCompaction:
    """Delete the model's changes with a seq up to `covered_seq` (what its snapshot holds) that are older
    than `retention_s`, and record the new horizon in the same transaction."""
    cutoff = (now or utcnow()) - timedelta(seconds=retention_s)
    with session_scope(session_factory) as session:
        mine = Change.model_id == model_id
        horizon = feed_horizon(session, model_id)
        target = session.scalar(
            select(func.max(Change.seq)).where(mine, Change.seq <= covered_seq, Change.created_at <= cutoff)
        )
        pruned = 0
        if target is not None and target > horizon:
            result = session.execute(delete(Change).where(mine, Change.seq <= target))
            pruned = int(result.rowcount)  # type: ignore[attr-defined]
            _raise_horizon(session, model_id, target)
            horizon = target
        kept = session.scalar(select(func.count()).select_from(Change).where(mine)) or 0
    if pruned:
        logger.info("pruned %d change rows of %s (through seq %d; %d kept)", pruned, model_id, horizon, kept)
    return ModelCompaction(model_id, covered_seq, pruned, horizon, kept)


def _raise_horizon(session: Session, model_id: str, seq: int) -> None:
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(FeedHorizon).values(model_id=model_id, pruned_through=seq, updated_at=utcnow())
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["model_id"],
            set_={"pruned_through": stmt.excluded.pruned_through, "updated_at": stmt.excluded.updated_at},
            where=FeedHorizon.pruned_through < stmt.excluded.pruned_through,  # never lowered by a racing run
        )
    )


def snapshot_seq(data: DataDir, model_id: str) -> int | None:
    """The seq the model's snapshot on disk covers (its manifest's last_seq), None without one."""
    try:
        manifest = json.loads(data.index_manifest(model_id).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("model_id") != model_id:
        return None
    seq = manifest.get("last_seq")
    return seq if isinstance(seq, int) else None


def compact_feed(data: DataDir, session_factory: sessionmaker[Session], retention_s: float) -> CompactReport:
    """Prune every registered model's feed against its snapshot on disk; a model without one keeps its rows."""
    report = CompactReport(retention_s)
    with session_scope(session_factory) as session:
        model_ids = list(session.scalars(select(EmbeddingModel.id).order_by(EmbeddingModel.id)))
    for model_id in model_ids:
        covered = snapshot_seq(data, model_id)
        if covered is None:
            with session_scope(session_factory) as session:
                kept = session.scalar(select(func.count()).where(Change.model_id == model_id)) or 0
                horizon = feed_horizon(session, model_id)
            report.models.append(ModelCompaction(model_id, None, 0, horizon, kept))
            continue
        report.models.append(prune_model(session_factory, model_id, covered, retention_s))
    return report
