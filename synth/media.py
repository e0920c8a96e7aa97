"""Writing test media with PyAV: RGB frame lists, fast moving-pattern videos, and deliberately broken files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

logger = logging.getLogger(__name__)

# Only x264 gets the preset and B-frame options; other encoders keep their defaults.
_X264 = {"libx264"}


def _add_video_stream(
    container: av.container.OutputContainer,
    codec: str,
    width: int,
    height: int,
    fps: float,
    pix_fmt: str,
    gop: int,
    options: dict[str, str],
) -> av.video.stream.VideoStream:
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    if not isinstance(stream, av.video.stream.VideoStream):
        raise ValueError(f"{codec!r} is not a video encoder; use e.g. libx264, libvpx-vp9, mpeg4")
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    stream.gop_size = gop
    stream.options = dict(options)
    return stream


def encode_frames(
    path: str | Path,
    frames: Sequence[np.ndarray],
    fps: float,
    *,
    crf: int = 20,
    preset: str = "superfast",
    faststart: bool = True,
) -> None:
    """Write uint8 RGB frames [H, W, 3] (even sides) as H.264 yuv420p mp4, deterministically (one thread)."""
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    height, width = frames[0].shape[:2]
    opts = {"crf": str(crf), "preset": preset, "threads": "1"}
    movflags = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=movflags) as container:
        stream = _add_video_stream(container, "libx264", width, height, fps, "yuv420p", 250, opts)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_pattern_video(
    path: str | Path,
    duration_s: float,
    width: int,
    height: int,
    fps: float,
    gop: int = 250,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    *,
    bframes: int = 3,
    rotation: int = 0,
    faststart: bool = False,
    container_format: str | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """A textured pattern drifting across the frame; quick to write (ultrafast) even at 1080p.

    With libx264, `bframes` B-frames are used in every mini-GOP (x264's default count, forced on,
    since x264 would pick few for such uniform motion); `bframes=0` gives a P-only stream.
    `rotation` stores a display rotation (counter-clockwise degrees), as phones do. The container is
    guessed from the suffix unless `container_format` names it (with `container_options` for its muxer).
    """
    if width % 2 or height % 2 or width < 2 or height < 2:
        raise ValueError(f"width and height must be even and >= 2 for {pix_fmt}, got {width}x{height}")
    count = max(1, round(duration_s * fps))
    options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
    if codec in _X264:
        bpyr = "normal" if bframes >= 2 else "none"
        options |= {
            "preset": "ultrafast",
            "crf": "26",
            "x264-params": f"bframes={bframes}:b-adapt=0:b-pyramid={bpyr}",
        }
    path = Path(path)
    container_opts = {"movflags": "+faststart"} if faststart and path.suffix in {".mp4", ".mov"} else {}
    container_opts |= container_options or {}
    yy, xx = np.mgrid[0 : 2 * height, 0 : 2 * width]
    luma = ((xx // 24 + yy // 24) % 2 * 96 + 40 + (xx * 96) // (2 * width)).astype(np.uint8)
    chroma = (128 + 60 * np.sin(xx[::2, ::2] / 37.0) * np.cos(yy[::2, ::2] / 53.0)).astype(np.uint8)
    with av.open(str(path), "w", format=container_format, options=container_opts) as container:
        stream = _add_video_stream(container, codec, width, height, fps, pix_fmt, gop, options)
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(count):
            ox, oy = (i * 7) % width, (i * 3) % height
            frame = av.VideoFrame(width, height, "yuv420p")
            _fill_plane(frame.planes[0], luma[oy : oy + height, ox : ox + width])
            cy, cx = oy // 2, ox // 2
            _fill_plane(frame.planes[1], chroma[cy : cy + height // 2, cx : cx + width // 2])
            _fill_plane(frame.planes[2], chroma[::-1, ::-1][cy : cy + height // 2, cx : cx + width // 2])
            if pix_fmt != "yuv420p":
                frame = frame.reformat(format=pix_fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _fill_plane(plane: av.video.plane.VideoPlane, values: np.ndarray) -> None:
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
    rows[:, : plane.width] = values


def write_hostile_files(directory: str | Path) -> dict[str, Path]:
    """Files that must fail to decode, each for one reason; keys name the case."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    # Cut in half: without faststart the index (moov) is at the end and lost; with it, the data is.
    for key, faststart in (("truncated", False), ("truncated_faststart", True)):
        whole = write_pattern_video(d / f"{key}_whole.mp4", 2.0, 64, 64, 12, gop=12, faststart=faststart)
        data = whole.read_bytes()
        out[key] = d / f"{key}.mp4"
        out[key].write_bytes(data[: len(data) // 2])
        whole.unlink()
    out["zero_byte"] = d / "zero_byte.mp4"
    out["zero_byte"].write_bytes(b"")
    out["text"] = d / "text.mp4"
    out["text"].write_text("this is a text file, not a video\n" * 20)
    out["audio_only"] = d / "audio_only.mp4"
    write_tone(out["audio_only"])
    out["png"] = d / "png.mp4"
    out["png"].write_bytes(_png_bytes())
    return out


# File name -> (muxer, encoder, frame rate, muxer options): the containers cameras, phones, discs and old
# desktop tools write, each with an encoder FFmpeg builds have. MXF and VOB want a broadcast frame rate;
# AVCHD and Blu-ray transport streams have 192-byte packets.
FORMAT_SAMPLES: dict[str, tuple[str, str, int, dict[str, str]]] = {
    "broadcast.ts": ("mpegts", "libx264", 8, {}),
    "camcorder.mts": ("mpegts", "libx264", 8, {"mpegts_m2ts_mode": "1"}),
    "bluray.m2ts": ("mpegts", "libx264", 8, {"mpegts_m2ts_mode": "1"}),
    "phone.3gp": ("3gp", "mpeg4", 8, {}),
    "flash.flv": ("flv", "flv", 8, {}),
    "desktop.wmv": ("asf", "wmv2", 8, {}),
    "studio.mxf": ("mxf", "mpeg2video", 25, {}),
    "disc.vob": ("vob", "mpeg2video", 25, {}),
}


def write_format_samples(directory: str | Path, seconds: float = 1.0) -> dict[str, Path]:
    """One small clip per container of FORMAT_SAMPLES, plus an mp4 renamed `.dat` and one without a suffix.

    Keys are the file names; every file is a video FFmpeg decodes, whatever its name says.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for n, (name, (fmt, codec, fps, opts)) in enumerate(FORMAT_SAMPLES.items()):
        out[name] = write_pattern_video(
            d / name, seconds + 0.125 * n, 64, 48, fps, gop=fps, codec=codec,
            container_format=fmt, container_options=opts,
        )  # fmt: skip
    for n, name in enumerate(("renamed.dat", "no_suffix")):
        tmp = write_pattern_video(d / f"{name}.tmp.mp4", seconds + 0.1 * (n + 1), 64, 48, 8, gop=8)
        out[name] = tmp.rename(d / name)
    return out


def write_tone(path: Path, seconds: float = 1.0, rate: int = 16_000) -> None:
    """An mp4 with one 440 Hz audio track and no video."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate).astype(np.float32)
        for i in range(0, len(samples), 1024):
            chunk = samples[i : i + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _png_bytes() -> bytes:
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32] = (200, 30, 30)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = 64, 48, "rgb24"
    return b"".join(bytes(p) for p in codec.encode(frame))
