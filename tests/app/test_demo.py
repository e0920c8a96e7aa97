"""`make demo`: the sample library is generated and indexed once, titled by caption, and its examples served."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers.ports import free_port

from app.demo import DemoError, choose_examples, prepare, read_manifest, resolve_model
from app.settings import DEMO_MODEL_DIR
from model.checkpoint import load_model, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_examples_cycle_visible_kinds_one_per_family():
    clips = [{"family": f, "kind": k, "caption": f"{f}-{k}"} for f in range(4) for k in ("base", "colour", "shape", "motion", "order", "background")]  # fmt: skip
    chosen = choose_examples(clips, 4)
    assert [(c["family"], c["kind"]) for c in chosen] == [(0, "colour"), (1, "shape"), (2, "background"), (3, "colour")]  # fmt: skip
    assert len(choose_examples(clips, 2)) == 2


def test_prepare_indexes_once_titles_by_caption_and_serves_examples(tmp_path, launch):
    data = tmp_path / "demo"
    first = prepare(data, "tiny", families=2, seed=7, examples=3)
    assert (first.generated, first.files, first.indexed, first.already) == (True, 12, 12, 0)
    clips = read_manifest(first.library)
    captions = {c["caption"] for c in clips}
    # Two families: one colour and one shape example, each a caption of a clip in the library.
    assert [e["kind"] for e in first.examples] == ["colour", "shape"]
    assert {e["query"] for e in first.examples} <= captions

    before = _mtimes(first.library)
    again = prepare(data, "tiny", families=2, seed=7, examples=3)
    assert (again.generated, again.reindexed, again.indexed, again.already) == (False, False, 0, 12)
    assert _mtimes(first.library) == before, "the second run rewrote the sample library"
    assert again.examples == first.examples

    with launch(data, f"sqlite:///{data / 'catalog.db'}", model="tiny") as client:
        videos = client.get("/videos", params={"limit": 100}).json()
        assert videos["count"] == 12
        assert {v["title"] for v in videos["data"]} == captions
        served = client.get("/demo/examples").json()["examples"]
        assert served == [{"query": e["query"], "video_id": e["video_id"]} for e in first.examples]
        for example in served:
            assert client.get(f"/videos/{example['video_id']}").json()["title"] == example["query"]


def test_a_changed_model_reindexes_the_demo_library(tmp_path):
    data = tmp_path / "demo"
    first = prepare(data, "tiny", families=1, seed=7, examples=1)
    model = load_model("tiny")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # other weights: another model id
    other = save_checkpoint(model, tmp_path / "other-model")
    report = prepare(data, str(other), families=1, seed=7, examples=1)
    assert report.reindexed and report.model_id != first.model_id
    assert (report.indexed, report.already) == (0, 6)


def test_examples_route_is_empty_without_a_demo_library(tmp_path, launch, new_database):
    with launch(tmp_path / "data", new_database("sqlite")) as client:
        assert client.get("/demo/examples").json() == {"examples": []}
        page = client.get("/").text
        assert 'id="examples"' in page


def test_a_missing_model_directory_is_reported_with_what_to_do(tmp_path):
    with pytest.raises(DemoError, match="TVS_MODEL"):
        resolve_model(str(tmp_path / "assets" / "demo-model"))
    assert resolve_model("tiny") == "tiny"


@pytest.mark.slow
def test_demo_script_prints_the_url_serves_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "VENV": str(Path(sys.executable).parent.parent),
        "TVS_DATA_DIR": str(tmp_path / "demo"),
        "TVS_MODEL": "tiny",
        "TVS_PORT": str(port),
    }
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "demo.sh"), "--families", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if "Demo ready" in line:
                break
        assert re.search(rf"Demo ready: open http://127\.0\.0\.1:{port}/", "".join(out)), "".join(out)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health").json()["ready"]
        example = httpx.get(f"{base}/demo/examples").json()["examples"][0]
        # min_score 0: this checks the ranking, not the model's cut-off (which may call it no good match).
        body = {"query": example["query"], "limit": 6, "min_score": 0}
        top = httpx.post(f"{base}/search", json=body).json()["results"]
        assert len(top) == 6 and example["video_id"] in {r["video_id"] for r in top}
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(out) + rest
    assert "demo: stopped" in rest


@pytest.mark.slow
@pytest.mark.skipif(
    not (REPO / DEMO_MODEL_DIR).is_dir(),
    reason=f"no trained demo model at {DEMO_MODEL_DIR} (random weights rank arbitrarily)",
)
def test_each_demo_example_finds_its_clip_first(tmp_path, launch):
    data = tmp_path / "demo"
    model = str(REPO / DEMO_MODEL_DIR)
    report = prepare(data, model)  # the library, model and examples `make demo` uses
    assert len(report.examples) == 4
    with launch(data, f"sqlite:///{data / 'catalog.db'}", model=model) as client:
        for example in report.examples:
            body = {"query": example["query"], "limit": 1, "min_score": 0}  # the ranking, not the cut-off
            top = client.post("/search", json=body).json()["results"][0]
            assert (top["video_id"], top["title"]) == (example["video_id"], example["query"]), example
