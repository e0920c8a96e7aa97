"""The data directory layout: the one place that knows where each artifact lives."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from indexer.db import default_database_url

logger = logging.getLogger(__name__)

# Names that say "video": a folder scan hands these to FFmpeg unless their first bytes say otherwise (any other
# file is taken when its bytes look like a video container, `model.video.formats`). Stored copies keep these suffixes.
VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mkv .webm .mov .qt .avi .divx .mpg .mpeg .mpe .m1v .m2v .vob .mod .tod .vro .ts .mts .m2ts "
    ".m2t .tp .trp .3gp .3g2 .wmv .asf .flv .f4v .mxf .ogv .ogm .rm .rmvb .dv .nut .ivf .y4m .h264 .264 "
    ".h265 .265 .hevc .amv .insv".split()
)
# Files that sit beside videos (subtitles, camera thumbnails and proxies, photo edits, disc structure):
# skipped by a folder scan without being opened. GoPro .lrv and DJI .lrf are low-resolution copies of a
# video that is indexed from its own file.
SIDECAR_EXTENSIONS = frozenset(
    ".srt .vtt .ass .ssa .sub .idx .sup .xmp .thm .lrv .lrf .aae .nfo .ifo .bup .cpi .mpl .bdm .clpi .mpls".split()
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(model_id: str) -> str:
    """A model id as a file name ("ViT-B-32:openai-ab12" -> "ViT-B-32_openai-ab12")."""
    name = _UNSAFE.sub("_", model_id)
    if not name.strip("._"):
        raise ValueError(f"model id {model_id!r} gives no usable file name; use letters, digits, '-' or '_'")
    return name


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataDir:
    """`root/` = catalog.db, videos/, incoming/, thumbs/<video_id>/<ordinal>.jpg, tokens/<model>/, index/."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"DataDir({str(self.root)!r})"

    def ensure(self) -> DataDir:
        for folder in (
            self.root,
            self.videos,
            self.incoming,
            self.thumbs,
            self.root / "tokens",
            self.index_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def catalog_db(self) -> Path:
        return self.root / "catalog.db"

    @property
    def database_url(self) -> str:
        """The default catalog: a SQLite file inside the data directory."""
        return default_database_url(self.root)

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def thumbs(self) -> Path:
        return self.root / "thumbs"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    def stored_video(self, sha256: str, suffix: str) -> Path:
        # Content-addressed: two processes storing the same file race to the same name, harmlessly.
        suffix = suffix.lower() if suffix.lower() in VIDEO_EXTENSIONS else ".bin"
        return self.videos / sha256[:2] / f"{sha256}{suffix}"

    def thumb_relpath(self, video_id: int, ordinal: int) -> str:
        return f"thumbs/{video_id}/{ordinal}.jpg"

    def thumb_dir(self, video_id: int) -> Path:
        return self.thumbs / str(video_id)

    def tokens_dir(self, model_id: str) -> Path:
        return self.root / "tokens" / safe_name(model_id)

    def journal_dir(self, model_id: str) -> Path:
        """Per video: segment ids whose tokens are written but whose catalog rows may not be committed yet."""
        return self.tokens_dir(model_id) / "pending"

    def write_pending(self, model_id: str, video_id: int, ids: list[int]) -> None:
        """Name the ids before their token records are written (fsynced), so a crash leaves no unknown orphans."""
        folder = self.journal_dir(model_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{video_id}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"video_id": video_id, "ids": [int(i) for i in ids]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)

    def pending(self, model_id: str) -> dict[int, list[int]]:
        """video id -> journalled segment ids, for every video of this model with a journal."""
        out: dict[int, list[int]] = {}
        folder = self.journal_dir(model_id)
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                entry = json.loads(path.read_text())
                out[int(entry["video_id"])] = [int(i) for i in entry["ids"]]
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning("ignoring unreadable journal %s; move it away", path)
        return out

    def clear_pending(self, model_id: str, video_id: int) -> None:
        # No fsync: a journal that survives a crash names committed ids, which are never freed.
        (self.journal_dir(model_id) / f"{video_id}.json").unlink(missing_ok=True)

    def index_path(self, model_id: str) -> Path:
        """The FAISS snapshot; its manifest sits beside it (`<path>.manifest.json`)."""
        return self.index_dir / f"{safe_name(model_id)}.faiss"

    def index_manifest(self, model_id: str) -> Path:
        return self.index_dir / f"{safe_name(model_id)}.faiss.manifest.json"

    def resolve(self, stored_path: str) -> Path:
        """A catalog `stored_path` (relative to the data directory, or absolute) as an absolute path."""
        path = Path(stored_path)
        return path if path.is_absolute() else self.root / path

    def relative(self, path: Path) -> str:
        """How the catalog records a path: relative when inside the data directory, else absolute."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
