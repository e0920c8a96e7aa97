"""Read-side service functions: catalog rows as API shapes, and the files behind media and thumbnails."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.schemas import (
    JobPublic,
    JobsPublic,
    SearchHit,
    SegmentPublic,
    VideoDetail,
    VideoPublic,
    VideosPublic,
)
from app.search_types import Hit
from indexer import catalog, jobs
from indexer.catalog import Job, Segment, Video
from indexer.paths import DataDir
from model.video.formats import OCTET_STREAM, sniff_file

logger = logging.getLogger(__name__)

# By suffix, only for a file whose first bytes match no known container (FFmpeg may still read it).
_MEDIA_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".mov": "video/quicktime",
    ".avi": "video/x-msvideo",
    ".mpg": "video/mpeg",
    ".mpeg": "video/mpeg",
}


def media_url(video_id: int) -> str:
    return f"/videos/{video_id}/media"


def thumbnail_url(segment_id: int) -> str:
    return f"/segments/{segment_id}/thumbnail"


def _first_thumbnails(session: Session, video_ids: list[int]) -> dict[int, int]:
    """video id -> the segment id of its first thumbnail, in one query for a whole page."""
    if not video_ids:
        return {}
    has_thumb = Segment.thumbnail.is_not(None)
    first = (
        select(Segment.video_id, func.min(Segment.ordinal).label("ordinal"))
        .where(Segment.video_id.in_(video_ids), has_thumb)
        .group_by(Segment.video_id)
        .subquery()
    )
    stmt = (
        select(Segment.video_id, Segment.id)
        .join(first, (Segment.video_id == first.c.video_id) & (Segment.ordinal == first.c.ordinal))
        .where(has_thumb)
    )
    return {video_id: seg_id for video_id, seg_id in session.execute(stmt).tuples()}


def video_public(video: Video, thumb: int | None) -> VideoPublic:
    return VideoPublic(
        id=video.id,
        title=video.title,
        filename=video.filename,
        status=video.status,
        error=video.error,
        size_bytes=video.size_bytes,
        duration=video.duration_s,
        fps=video.fps,
        width=video.width,
        height=video.height,
        meta=video.meta or {},
        created_at=video.created_at,
        updated_at=video.updated_at,
        media_url=media_url(video.id),
        thumbnail_url=thumbnail_url(thumb) if thumb is not None else None,
    )


def job_public(job: Job, video_title: str | None = None) -> JobPublic:
    return JobPublic(
        id=job.id,
        kind=job.kind,
        video_id=job.video_id,
        state=job.state,  # type: ignore[arg-type]  # the catalog's check constraint holds it to JobState
        progress=job.progress,
        error=job.error,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        url=job.url,
        title=video_title or job.title,
        bytes_done=job.bytes_done,
        bytes_total=job.bytes_total,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
    )


def list_videos(session: Session, *, offset: int, limit: int, status: str | None) -> VideosPublic:
    rows, total = catalog.list_videos(session, offset=offset, limit=limit, status=status)
    thumbs = _first_thumbnails(session, [v.id for v in rows])
    data = [video_public(v, thumbs.get(v.id)) for v in rows]
    return VideosPublic(data=data, count=total, offset=offset, limit=limit)


def get_video_detail(session: Session, *, video_id: int) -> VideoDetail | None:
    video = catalog.get_video(session, video_id)
    if video is None or video.status == "deleted":
        return None
    segments = catalog.segments_for_video(session, video_id)
    latest = session.scalars(
        select(Job).where(Job.video_id == video_id).order_by(Job.id.desc()).limit(1)
    ).first()
    return VideoDetail(
        **video_public(video, _first_thumbnails(session, [video_id]).get(video_id)).model_dump(),
        segments=[
            SegmentPublic(
                id=s.id,
                ordinal=s.ordinal,
                start=s.start_s,
                end=s.end_s,
                thumbnail_url=thumbnail_url(s.id) if s.thumbnail else None,
            )
            for s in segments
        ],
        latest_job=job_public(latest) if latest is not None else None,
    )


def _video_titles(session: Session, video_ids: list[int]) -> dict[int, str | None]:
    if not video_ids:
        return {}
    rows = session.execute(select(Video.id, Video.title).where(Video.id.in_(video_ids))).tuples()
    return {video_id: title for video_id, title in rows}


def get_job(session: Session, *, job_id: int) -> JobPublic | None:
    job = jobs.get_job(session, job_id)
    if job is None:
        return None
    titles = _video_titles(session, [job.video_id] if job.video_id is not None else [])
    return job_public(job, titles.get(job.video_id or 0))


def list_jobs(session: Session, *, state: str | None, limit: int, cursor: int | None) -> JobsPublic:
    rows, total = jobs.list_jobs(session, state=state, limit=limit + 1, before=cursor)
    page = rows[:limit]  # one more was read only to know whether there is a next page
    titles = _video_titles(session, [j.video_id for j in page if j.video_id is not None])
    data = [job_public(j, titles.get(j.video_id or 0)) for j in page]
    return JobsPublic(data=data, count=total, next_cursor=page[-1].id if len(rows) > limit else None)


def media_file(session: Session, data: DataDir, *, video_id: int) -> tuple[Path, str] | None:
    """The stored video file and its media type; None when the video or its file is gone."""
    video = catalog.get_video(session, video_id)
    if video is None or video.status == "deleted" or not video.stored_path:
        return None
    path = data.resolve(video.stored_path)
    # A relative path is a file the service stored: it must stay inside the data directory (no `..`, no
    # symlink out). An absolute one is a library file indexed in place (`indexer add`, an allowed root).
    inside = Path(video.stored_path).is_absolute() or path.resolve().is_relative_to(data.root.resolve())
    if not inside or not path.is_file():
        return None
    return path, media_type(path, video.filename)


def media_type(path: Path, filename: str | None = None) -> str:
    """The container's MIME type from the file's first bytes (the same signatures FFmpeg probes), so a
    stored `.bin` upload, a renamed file or a `.mts` is served as what it is; else by suffix."""
    try:
        signature = sniff_file(path)
    except OSError:
        signature = None
    if signature is not None and signature.format is not None:
        return signature.mime
    suffix = Path(filename or path.name).suffix.lower()
    kind = _MEDIA_TYPES.get(path.suffix.lower()) or _MEDIA_TYPES.get(suffix)
    # Never a type guessed from any other name: a browser must not run a stored file as a page.
    return kind or OCTET_STREAM


def thumbnail_file(session: Session, data: DataDir, *, segment_id: int) -> Path | None:
    segment = session.get(Segment, segment_id)
    if segment is None or not segment.thumbnail:
        return None
    path = data.resolve(segment.thumbnail)
    # Thumbnails live under data/thumbs; a catalog row pointing elsewhere is not served.
    if not path.resolve().is_relative_to(data.thumbs.resolve()) or not path.is_file():
        return None
    return path


def hit_public(hit: Hit, rank: int, below_threshold: bool = False) -> SearchHit:
    seg = hit.segment
    return SearchHit(
        rank=rank,
        video_id=seg.video_id,
        title=seg.title,
        segment_id=seg.id,
        ordinal=seg.ordinal,
        start=round(seg.start_s, 3),
        end=round(seg.end_s, 3),
        score=hit.score,
        broad_score=hit.broad_score,
        delta=hit.delta,
        broad_rank=hit.broad_rank,
        evidence_time=round(hit.evidence_time, 3) if hit.evidence_time is not None else None,
        thumbnail_url=thumbnail_url(seg.id) if seg.has_thumbnail else None,
        media_url=f"{media_url(seg.video_id)}#t={seg.start_s:.3f},{seg.end_s:.3f}",
        below_threshold=below_threshold,
    )
