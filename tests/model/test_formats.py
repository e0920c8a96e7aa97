"""model.video.formats: containers are recognised as the demuxer FFmpeg picks, and non-videos as what they are."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from model.video.formats import EMPTY, OCTET_STREAM, Signature, sniff, sniff_file
from synth.media import FORMAT_SAMPLES, write_format_samples, write_pattern_video, write_tone

MIME = {
    "broadcast.ts": "video/mp2t",
    "camcorder.mts": "video/mp2t",
    "bluray.m2ts": "video/mp2t",
    "phone.3gp": "video/3gpp",
    "flash.flv": "video/x-flv",
    "desktop.wmv": "video/x-ms-asf",
    "studio.mxf": "application/mxf",
    "disc.vob": "video/mpeg",
    "renamed.dat": "video/mp4",
    "no_suffix": "video/mp4",
    "clip.mkv": "video/x-matroska",
    "clip.webm": "video/webm",
    "clip.mov": "video/quicktime",
    "clip.avi": "video/x-msvideo",
    "clip.mpg": "video/mpeg",
    "clip.mp4": "video/mp4",
}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("formats")
    files = write_format_samples(folder)
    for name, codec, fps in [
        ("clip.mkv", "libx264", 8),
        ("clip.webm", "libvpx-vp9", 8),
        ("clip.mov", "libx264", 8),
        ("clip.avi", "mpeg4", 8),
        ("clip.mpg", "mpeg2video", 25),
        ("clip.mp4", "libx264", 8),
    ]:
        files[name] = write_pattern_video(folder / name, 0.5, 32, 32, fps, gop=8, codec=codec)
    return files


def test_every_sample_format_is_written(samples: dict[str, Path]) -> None:
    assert set(FORMAT_SAMPLES) <= set(samples) and set(samples) == set(MIME)


@pytest.mark.parametrize("name", sorted(MIME))
def test_a_container_is_the_demuxer_ffmpeg_picks_with_its_mime_type(
    samples: dict[str, Path], name: str
) -> None:
    with av.open(str(samples[name])) as container:
        demuxer = container.format.name
    assert sniff_file(samples[name]) == Signature(demuxer, MIME[name])


def test_transport_stream_packet_sizes(samples: dict[str, Path]) -> None:
    # 188-byte packets, and the 192-byte ones of AVCHD/Blu-ray (a 4-byte timestamp before each sync byte).
    assert samples["broadcast.ts"].read_bytes()[188] == 0x47
    m2ts = samples["camcorder.mts"].read_bytes()
    assert m2ts[0] != 0x47 and m2ts[4] == m2ts[196] == 0x47
    # Cut anywhere inside the first packet, a stream is still recognised by its rhythm.
    assert sniff(m2ts[100:3000]).format == "mpegts"


def test_non_videos_are_named_without_ffmpeg(tmp_path: Path) -> None:
    write_tone(tmp_path / "tone.mp4")
    cases = {
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00": "image/jpeg",
        b"\x89PNG\r\n\x1a\n\x00\x00": "image/png",
        b"%PDF-1.7\n%\xe2\xe3": "application/pdf",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic": "image/heic",
        b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00": "audio/mp4",
        b"ID3\x04\x00\x00\x00\x00\x00\x00": "audio/mpeg",
        b"OggS\x00\x02" + b"\x00" * 22 + b"\x01\x1e\x01vorbis": "audio/ogg",
        "subtitles, caf\u00e9 notes\n".encode() * 10: "text/plain",
        b"": EMPTY,
        bytes(range(256)) * 4: OCTET_STREAM,
    }
    for head, mime in cases.items():
        assert sniff(head) == Signature(None, mime), head[:16]
    # An mp4 holding only audio looks like a container: FFmpeg decides (no video stream).
    assert sniff_file(tmp_path / "tone.mp4").format == "mov,mp4,m4a,3gp,3g2,mj2"


def test_video_signatures_without_a_sample_file() -> None:
    cases = {
        b"OggS\x00\x02" + b"\x00" * 22 + b"\x80theora": ("ogg", "video/ogg"),
        b"\x00\x00\x00\x08wide\x00\x00\x10\x00mdat": ("mov,mp4,m4a,3gp,3g2,mj2", "video/quicktime"),
        b"\x00\x00\x00\x01\x67\x42\xc0\x1e": ("h264", "video/h264"),
        b"\x00\x00\x00\x01\x40\x01\x0c\x01": ("hevc", "video/h265"),
        b"DKIF\x00\x00\x20\x00VP80": ("ivf", "video/x-ivf"),
        b".RMF\x00\x00\x00\x12": ("rm", "application/vnd.rn-realmedia"),
    }
    for head, (demuxer, mime) in cases.items():
        assert sniff(head) == Signature(demuxer, mime), head[:16]
