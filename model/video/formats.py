"""Recognising media by its first bytes, without FFmpeg: which demuxer would read it, and its MIME type."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Enough for every check below: five 192-byte m2ts packets at any offset inside the first packet.
HEAD_BYTES = 2048
OCTET_STREAM = "application/octet-stream"
EMPTY = "inode/x-empty"

# `Signature.format` is the FFmpeg demuxer name (PyAV's `container.format.name`) that reads the file: one
# demuxer reads mp4, mov and 3gp (and another mkv and webm), so the MIME type comes from the brand or DocType.
_ISO = "mov,mp4,m4a,3gp,3g2,mj2"
_QT_ATOMS = (b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
_IMAGE_BRANDS = {
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"heim": "image/heic",
    b"heis": "image/heic",
    b"hevc": "image/heic-sequence",
    b"mif1": "image/heif",
    b"msf1": "image/heif-sequence",
    b"avif": "image/avif",
    b"avis": "image/avif",
}
_AUDIO_BRANDS = (b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B ")
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
_MXF_KEY = bytes.fromhex("060e2b34020501010d010201")
# (prefix, MIME) of common files that are certainly not video; checked after the video signatures.
_NOT_VIDEO = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),  # also most camera raw files (CR2, NEF, ARW, DNG)
    (b"MM\x00*", "image/tiff"),
    (b"%PDF", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"SQLite format 3\x00", "application/vnd.sqlite3"),
    (b"\x7fELF", "application/x-executable"),
    (b"ID3", "audio/mpeg"),
    (b"fLaC", "audio/flac"),
)


@dataclass(frozen=True)
class Signature:
    """What the first bytes say: `format` is the FFmpeg demuxer expected to read a video, or None."""

    format: str | None
    mime: str

    @property
    def known(self) -> bool:
        """True when the bytes were recognised (a video container, or something that is surely not one)."""
        return self.mime != OCTET_STREAM


# Containers told by a fixed prefix alone (the others need a closer look below).
_PREFIXES = (
    (_ASF_GUID, Signature("asf", "video/x-ms-asf")),
    (b"FLV\x01", Signature("flv", "video/x-flv")),
    (_MXF_KEY, Signature("mxf", "application/mxf")),
    (b"\x00\x00\x01\xba", Signature("mpeg", "video/mpeg")),
    (b"\x00\x00\x01\xb3", Signature("mpegvideo", "video/mpeg")),
    (b".RMF", Signature("rm", "application/vnd.rn-realmedia")),
    (b"DKIF", Signature("ivf", "video/x-ivf")),
    (b"YUV4MPEG2", Signature("yuv4mpegpipe", "video/x-yuv4mpeg")),
    (b"nut/multimedia container", Signature("nut", "video/x-nut")),
)


def read_head(path: str | Path, size: int = HEAD_BYTES) -> bytes:
    """The first `size` bytes of a file; raises OSError."""
    with open(path, "rb") as f:
        return f.read(size)


def sniff_file(path: str | Path) -> Signature:
    return sniff(read_head(path))


def sniff(head: bytes) -> Signature:
    """Classify a file by its first bytes (HEAD_BYTES of them is enough)."""
    if not head:
        return Signature(None, EMPTY)
    video = _video_signature(head)
    if video is not None:
        return video
    for prefix, mime in _NOT_VIDEO:
        if head.startswith(prefix):
            return Signature(None, mime)
    if _transport_stream(head):  # after the fixed signatures: it is the only one found by a pattern
        return Signature("mpegts", "video/mp2t")
    if head[:4] == b"RIFF":
        kind = {b"WAVE": "audio/wav", b"WEBP": "image/webp"}.get(head[8:12], OCTET_STREAM)
        return Signature(None, kind)
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return Signature(None, "audio/aac")  # ADTS
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return Signature(None, "audio/mpeg")  # an MP3 frame without ID3 tag
    if _looks_like_text(head):
        return Signature(None, "text/plain")
    return Signature(None, OCTET_STREAM)


def _video_signature(head: bytes) -> Signature | None:
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _IMAGE_BRANDS:
            return Signature(None, _IMAGE_BRANDS[brand])
        if brand in _AUDIO_BRANDS:
            return Signature(None, "audio/mp4")
        if brand == b"qt  ":
            return Signature(_ISO, "video/quicktime")
        if brand.startswith(b"3g2"):
            return Signature(_ISO, "video/3gpp2")
        if brand.startswith(b"3g"):
            return Signature(_ISO, "video/3gpp")
        return Signature(_ISO, "video/mp4")
    if head[4:8] in _QT_ATOMS:
        return Signature(_ISO, "video/quicktime")  # old QuickTime files have no ftyp
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Signature("matroska,webm", "video/webm" if b"webm" in head[:64] else "video/x-matroska")
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX", b"AMV "):
        return Signature("avi", "video/x-msvideo")
    for prefix, signature in _PREFIXES:
        if head.startswith(prefix):
            return signature
    if head.startswith(b"OggS"):
        # Every stream's first page comes first; an Ogg with only Vorbis, Opus or FLAC is audio.
        audio = any(tag in head for tag in (b"\x01vorbis", b"OpusHead", b"\x7fFLAC"))
        video = any(tag in head for tag in (b"\x80theora", b"\x01video", b"OVP80"))
        return Signature("ogg", "video/ogg") if video or not audio else Signature(None, "audio/ogg")
    if head.startswith(b"\x00\x00\x00\x01") and len(head) > 4:
        nal = head[4]
        if nal & 0x1F in (6, 7, 9) and nal < 0x80:
            return Signature("h264", "video/h264")
        if (nal >> 1) & 0x3F in (32, 35, 39):
            return Signature("hevc", "video/h265")
    return None


def _transport_stream(head: bytes) -> bool:
    """MPEG-TS: a 0x47 sync byte every 188 bytes (192 in Blu-ray/AVCHD .m2ts, 204 with Reed-Solomon)."""
    for stride in (188, 192, 204):
        packets = min(5, len(head) // stride)
        if packets < 2:
            continue
        for offset in range(min(stride, len(head) - (packets - 1) * stride)):
            if all(head[offset + k * stride] == 0x47 for k in range(packets)):
                return True
    return False


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of the head
            return False
        text = head[: e.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\t\r\n\f" for ch in text)
    return bool(text) and printable >= 0.95 * len(text)
