"""`make demo`: a generated sample library, indexed with the demo model, served with example queries."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import AppError, UserError
from app.routes.demo import EXAMPLES_FILE
from app.settings import DEMO_MODEL_DIR, Settings

if TYPE_CHECKING:
    from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("data/demo")
LIBRARY_DIR = "library"  # under the data directory
LIBRARY_STAMP = "synth.json"  # the generator's arguments, written after the library is complete
# The demo model is trained on `python -m synth --families 420 --seed 0`: seed 7 draws clips
# (colours, shapes, directions, backgrounds, caption templates) it never saw.
DEMO_SEED = 7
DEMO_FAMILIES = 8
DEMO_EXAMPLES = 4
# A family's colour, shape and background siblings differ from their nearest look-alike (the base clip)
# in something a single frame shows. Base, motion and order captions hinge on which way things move or
# in which order: the small model reads that less reliably, so they are not offered as examples.
EXAMPLE_KINDS = ("colour", "shape", "background")


class DemoError(AppError, UserError, RuntimeError):
    """The demo cannot be prepared (missing model, failed files); the message says what to do."""


@dataclass
class DemoReport:
    data_dir: Path
    library: Path
    model_id: str
    generated: bool  # this run wrote the sample library
    reindexed: bool  # the library was indexed with another model before and was switched to this one
    files: int
    indexed: int  # videos indexed by this run
    already: int  # videos indexed by an earlier run
    seconds: float
    examples: list[dict[str, Any]] = field(default_factory=list)


def library_params(families: int, seed: int) -> dict[str, Any]:
    return {"families": families, "seed": seed, "holdout": 0.0, "size": 128, "fps": 12, "seconds": 3.0}


def ensure_library(library: Path, families: int, seed: int) -> bool:
    """Generate the sample library unless a complete one with the same arguments is there; True if written."""
    from synth.generator import generate_library

    params = library_params(families, seed)
    stamp = library / LIBRARY_STAMP
    try:
        if json.loads(stamp.read_text()) == params and (library / "manifest.jsonl").is_file():
            return False
    except (OSError, ValueError):
        pass  # no stamp, or an unreadable one: (re)generate
    stamp.unlink(missing_ok=True)
    generate_library(library, workers=min(2, os.cpu_count() or 1), **params)
    stamp.write_text(json.dumps(params, indent=2) + "\n")
    return True


def read_manifest(library: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (library / "manifest.jsonl").read_text().splitlines() if line]
    return [{**line, "path": (library / line["video"]).resolve()} for line in lines]


def choose_examples(clips: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """One clip per family, cycling through EXAMPLE_KINDS (family 0 colour, 1 shape, 2 background, ...)."""
    by_family: dict[int, dict[str, dict[str, Any]]] = {}
    for clip in clips:
        by_family.setdefault(int(clip["family"]), {})[clip["kind"]] = clip
    chosen = []
    for n, family in enumerate(sorted(by_family)):
        example = by_family[family].get(EXAMPLE_KINDS[n % len(EXAMPLE_KINDS)])
        if example is not None:
            chosen.append(example)
        if len(chosen) == count:
            break
    return chosen


def _bar(what: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=0, unit="video", desc=what, disable=None, file=sys.stderr)


def index_library(factory: Any, data: Any, model: TokenBinder, clips_dir: Path) -> tuple[Any, bool]:
    """`indexer add` on the clips (files already indexed are skipped by sha256); switch models if needed."""
    from indexer.bulk import add_paths, reindex
    from indexer.catalog import register_model

    reindexed = False
    if not register_model(factory, model, require_active=False):
        print(f"demo: the library was indexed with another model; re-indexing it with {model.model_id}")
        bar = _bar("re-indexing")
        try:
            report = reindex(factory, data, model, on_start=_start(bar), on_result=lambda _r: bar.update(1))
        finally:
            bar.close()
        if report.failed:
            raise DemoError(f"re-indexing failed for {len(report.failed)} video(s): {report.failed}")
        reindexed = True
    bar = _bar("indexing")
    try:
        report = add_paths(
            factory,
            data,
            model,
            [clips_dir],
            on_start=_start(bar),
            on_skip=lambda: bar.update(1),
            on_result=lambda _r: bar.update(1),
        )
    finally:
        bar.close()
    if report.failed:
        raise DemoError(f"{len(report.failed)} sample clip(s) failed to index: {report.failed}")
    return report, reindexed


def _start(bar: Any) -> Any:
    def start(total: int) -> None:
        bar.total = total
        bar.refresh()

    return start


def title_videos(factory: Any, clips: list[dict[str, Any]]) -> dict[Path, int]:
    """Give each clip's video its caption as the title (shown on the result cards); {clip path: video id}."""
    from indexer import catalog
    from indexer.db import session_scope
    from indexer.ingest import sha256_file

    ids: dict[Path, int] = {}
    with session_scope(factory) as session:
        for clip in clips:
            video = catalog.get_video_by_sha256(session, sha256_file(clip["path"])[0])
            if video is None:
                raise DemoError(f"{clip['path']} is not in the catalog after indexing")
            if video.title != clip["caption"]:
                video.title = clip["caption"]
            ids[clip["path"]] = video.id
    return ids


def prepare(
    data_dir: str | Path,
    model_spec: str,
    *,
    families: int = DEMO_FAMILIES,
    seed: int = DEMO_SEED,
    examples: int = DEMO_EXAMPLES,
    database_url: str | None = None,
) -> DemoReport:
    """Generate (once), migrate, index (new files only) and write the examples file; safe to re-run."""
    from indexer.db import make_engine, make_session_factory
    from indexer.paths import DataDir
    from indexer.schema import ensure_schema
    from model.checkpoint import load_model
    from model.inference import prepare_for_inference

    started = time.monotonic()
    data = DataDir(data_dir).ensure()
    library = data.root / LIBRARY_DIR
    generated = ensure_library(library, families, seed)
    clips = read_manifest(library)
    url = database_url or data.database_url
    model = prepare_for_inference(load_model(model_spec))
    engine = make_engine(url)
    try:
        ensure_schema(engine, auto_migrate=True)  # the demo is `indexer migrate` too; a no-op when current
        factory = make_session_factory(engine)
        report, reindexed = index_library(factory, data, model, library / "clips")
        ids = title_videos(factory, clips)
    finally:
        engine.dispose()
    chosen = [
        {"query": c["caption"], "video_id": ids[c["path"]], "kind": c["kind"]}
        for c in choose_examples(clips, examples)
    ]
    payload = {"model_id": model.model_id, "library": str(library), "examples": chosen}
    tmp = data.root / (EXAMPLES_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, data.root / EXAMPLES_FILE)
    return DemoReport(
        data.root, library, model.model_id, generated, reindexed, report.files, report.indexed,
        report.already, time.monotonic() - started, chosen,
    )  # fmt: skip


def serve(settings: Settings, host: str, port: int, examples: list[dict[str, Any]]) -> None:
    """Run the API and the demo page until Ctrl-C (uvicorn shuts down gracefully on SIGINT/SIGTERM)."""
    import uvicorn

    from app.main import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning"))
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else shown}:{port}/"

    def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.1)
        lines = [f"\nDemo ready: open {url}", f"  API docs: {url}docs"]
        if examples:
            lines.append(f"  try: {examples[0]['query']}")
        lines.append("  Ctrl-C stops the server.\n")
        print("\n".join(lines), flush=True)

    threading.Thread(target=announce, name="announce", daemon=True).start()
    print("demo: starting the server (loading the model and the index)...", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: here, as an interrupt.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("demo: stopped", flush=True)


def _interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def resolve_model(spec: str) -> str:
    """The spec, or DemoError when it names a checkpoint directory that is not there."""
    path = Path(spec)
    if (path.is_absolute() or "/" in spec) and not path.is_dir():
        what = "the demo model is missing" if path == DEMO_MODEL_DIR else "the model directory is missing"
        raise DemoError(
            f"{what}: no {path}/ (the demo model is committed with the repository; `git status` / "
            "`git lfs pull`?). Point TVS_MODEL at another checkpoint directory or preset to use that instead."
        )
    return spec


def main(argv: list[str] | None = None) -> int:
    env = Settings()  # TVS_* and .env as the service reads them; the demo's own defaults where they are unset
    set_here = env.model_fields_set
    parser = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__)
    parser.add_argument(
        "--data-dir", default=str(env.data_dir if "data_dir" in set_here else DEFAULT_DATA_DIR)
    )
    parser.add_argument("--model", default=env.model if "model" in set_here else str(DEMO_MODEL_DIR))
    parser.add_argument("--host", default=os.environ.get("TVS_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("TVS_PORT", "8000")))
    parser.add_argument("--families", type=int, default=DEMO_FAMILIES, help="families of 6 clips each")
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    parser.add_argument("--examples", type=int, default=DEMO_EXAMPLES, help="example queries on the page")
    parser.add_argument("--prepare-only", action="store_true", help="prepare the library, do not serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model = resolve_model(args.model)
        print(f"demo: data in {args.data_dir}, model {model}", flush=True)
        report = prepare(
            args.data_dir,
            model,
            families=args.families,
            seed=args.seed,
            examples=args.examples,
            database_url=env.database_url,
        )
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted; `make demo` carries on from here next time", file=sys.stderr)
        return 130
    print(
        f"demo: {report.files} clips ({'generated now' if report.generated else 'generated earlier'}): "
        f"{report.indexed} indexed now, {report.already} already indexed; ready in {report.seconds:.1f} s",
        flush=True,
    )
    if args.prepare_only:
        return 0
    settings = env.model_copy(update={"data_dir": report.data_dir, "model": model})
    if "log_level" not in settings.model_fields_set:
        settings = settings.model_copy(
            update={"log_level": "WARNING"}
        )  # the console shows the demo's own lines
    serve(settings, args.host, args.port, report.examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
