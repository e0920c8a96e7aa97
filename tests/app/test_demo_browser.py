"""The demo page in headless Chromium: upload a generated clip, wait for it, search its caption, play it (on a
private server too, after giving the key it asks for); the search in the URL, paging, no good match; add a
URL that is no video, see it failed with the reason, retry it; delete a video from the library."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import httpx
import pytest

from app.settings import DEMO_MODEL_DIR

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]
REPO = Path(__file__).resolve().parents[2]
KEY = "browser-test-key-" + "k" * 16
# Sent with every direct API call; a server without a key ignores it.
AUTH = {"X-API-Key": KEY}


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not on the PATH (apt-get install chromium chromium-driver)")
    return path


class _NotAVideo(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"these are notes, not a video\n" * 20
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def notes_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotAVideo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("private", [False, True], ids=["open", "private"])
def test_upload_search_and_play_in_a_browser(
    serve, new_database, clips, tmp_path, api, private, notes_server
):
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    trained = (REPO / DEMO_MODEL_DIR).is_dir()
    # A background sibling: it differs from its look-alikes in what every frame shows (the demo page's
    # examples are such captions too); motion and order captions the small model ranks less reliably.
    target = next(c for c in clips if c["kind"] == "background")
    family = [c for c in clips if c["family"] == target["family"]]
    model = str(REPO / DEMO_MODEL_DIR) if trained else "tiny"
    artifacts = Path(os.environ.get("TVS_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    key = {"api_key": KEY} if private else {}
    with serve(
        tmp_path / "data", new_database("sqlite"), model=model, allow_private_urls=True, **key
    ) as base:
        if trained:
            # With a trained model the clip must beat its look-alike siblings; a random one cannot.
            for other in (c for c in family if c is not target):
                with open(other["path"], "rb") as f:
                    r = httpx.post(
                        f"{base}/videos",
                        files={"file": (other["path"].name, f)},
                        data={"title": other["caption"]},
                        headers={"X-API-Key": KEY},
                    )
                assert r.status_code == 202
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(base)
            sync_api.expect(page.locator("#status-text")).to_contain_text("indexed", timeout=20_000)
            if private:
                # The library answers 401: the page asks for the key, refuses a wrong one, takes the right one.
                dialog = page.locator("#key-dialog")
                sync_api.expect(dialog).to_be_visible(timeout=20_000)
                page.fill("#key-input", "not-the-key")
                page.click("#key-submit")
                sync_api.expect(page.locator("#key-error")).to_contain_text("not valid", timeout=10_000)
                page.fill("#key-input", KEY)
                page.click("#key-submit")
                sync_api.expect(dialog).to_be_hidden(timeout=10_000)

            page.set_input_files("#upload-file", str(target["path"]))
            page.fill("#upload-title", target["caption"])
            page.click("#upload-button")
            sync_api.expect(page.locator("#upload-state")).to_contain_text("Ready", timeout=90_000)
            sync_api.expect(page.locator("#library li")).to_have_count(6 if trained else 1, timeout=10_000)
            # <img> tags send no key: on a private server the session cookie is what loads them.
            page.wait_for_function(
                "() => [...document.querySelectorAll('#library img')].some((i) => i.naturalWidth > 0)",
                timeout=20_000,
            )

            page.fill("#query", target["caption"])
            page.press("#query", "Enter")
            cards = page.locator("#results .card")
            sync_api.expect(cards.first).to_be_visible(timeout=20_000)
            sync_api.expect(cards.first.locator(".card-title")).to_have_text(target["caption"])
            # The model's own cut-off applies: the page says "No good match" exactly when the API does.
            answer = httpx.post(
                f"{base}/search", json={"query": target["caption"], "limit": 12}, headers=AUTH
            ).json()
            no_match = page.locator("#no-match")
            if answer["no_good_match"]:
                sync_api.expect(no_match).to_be_visible()
                sync_api.expect(page.locator("#summary")).to_contain_text("best guess")
            else:
                sync_api.expect(no_match).to_be_hidden()
                sync_api.expect(page.locator("#summary")).to_contain_text("moment")
            sync_api.expect(cards.first).to_have_class(re.compile(r"\bhas-evidence\b"), timeout=10_000)

            cards.first.locator(".card-button").click()
            sync_api.expect(page.locator("#player")).to_be_visible()
            page.wait_for_function(
                "() => { const v = document.getElementById('player-video'); return v.currentTime > 0.2; }",
                timeout=20_000,
            )
            page.locator("#results").scroll_into_view_if_needed()
            shot = artifacts / ("demo-results-private.png" if private else "demo-results.png")
            page.screenshot(path=str(shot), full_page=True)

            # The search lives in the address bar, and back/forward walk through searches.
            assert parse_qs(urlparse(page.url).query)["q"] == [target["caption"]]
            page.fill("#query", "a second search")
            page.press("#query", "Enter")
            sync_api.expect(page.locator("#summary")).to_contain_text("a second search", timeout=20_000)
            assert parse_qs(urlparse(page.url).query)["q"] == ["a second search"]
            page.go_back()
            sync_api.expect(page.locator("#query")).to_have_value(target["caption"])
            sync_api.expect(page.locator("#summary")).to_contain_text(target["caption"], timeout=20_000)
            page.go_forward()
            sync_api.expect(page.locator("#query")).to_have_value("a second search")
            sync_api.expect(page.locator("#summary")).to_contain_text("a second search", timeout=20_000)

            # A shared link runs its search; "More results" follows the page token.
            page.goto(f"{base}/?q={quote(target['caption'])}&limit=2&min_score=0")
            sync_api.expect(page.locator("#query")).to_have_value(target["caption"])
            sync_api.expect(cards).to_have_count(min(2, len(family) if trained else 1), timeout=20_000)
            if trained:
                page.click("#more")
                sync_api.expect(cards).to_have_count(4, timeout=20_000)
                sync_api.expect(cards.nth(3).locator(".rank")).to_have_text("#4")
            # A cut-off nothing reaches: "No good match", and the best guesses under it.
            page.goto(f"{base}/?q={quote(target['caption'])}&min_score=100")
            sync_api.expect(no_match).to_be_visible(timeout=20_000)
            sync_api.expect(no_match).to_contain_text("No good match")
            sync_api.expect(page.locator("#results .card.guess")).to_have_count(len(family) if trained else 1)
            sync_api.expect(cards.first.locator(".card-title")).to_have_text(target["caption"])
            sync_api.expect(page.locator("#more")).to_be_hidden()
            # The library: the indexed clip says so; a URL that is no video fails with the reason, and retries.
            mine = page.locator("#library li", has_text=target["caption"])
            sync_api.expect(mine.locator(".badge")).to_have_text("indexed")
            page.fill("#upload-url", f"{notes_server}/notes.mp4")
            page.fill("#upload-title", "my notes")
            page.click("#upload-button")
            sync_api.expect(page.locator("#upload-state")).to_contain_text("not a video", timeout=60_000)
            notes = page.locator("#library li", has_text="my notes")
            sync_api.expect(notes.locator(".badge")).to_have_text("failed", timeout=10_000)
            sync_api.expect(notes.locator(".library-error")).to_contain_text("not a video")
            job = httpx.get(f"{base}/jobs", params={"state": "failed"}, headers=AUTH).json()["data"][0]
            with page.expect_response(lambda r: r.url.endswith(f"/jobs/{job['id']}/retry")) as retried:
                notes.get_by_role("button", name="Retry").click()
            assert retried.value.status == 200
            api_job = api.wait_job_until(
                _Client(base),
                job["id"],
                lambda j: j["state"] == "failed" and j["finished_at"] != job["finished_at"],
            )
            assert "not a video" in api_job["error"] and api_job["attempts"] == 1  # tried again, from 0
            sync_api.expect(notes.locator(".badge")).to_have_text("failed", timeout=10_000)

            # Delete from the library: the row goes, and the video is gone from the API.
            before = page.locator("#library li").count()
            mine.get_by_role("button", name="Delete").click()
            sync_api.expect(page.locator("#library li")).to_have_count(before - 1, timeout=10_000)
            assert (
                httpx.get(f"{base}/videos/{_video_id(base, target['caption'])}", headers=AUTH).status_code
                == 404
            )
            browser.close()
    assert shot.stat().st_size > 10_000
    if private:  # the refused requests before the key was given, and the wrong key, are expected
        problems = [p for p in problems if "status of 401 (Unauthorized)" not in p]
    assert not problems, problems
    if os.environ.get("TVS_UPDATE_SCREENSHOT") and not private:
        shutil.copyfile(shot, REPO / "docs" / "screenshot.png")


class _Client:
    """The one call Api.wait_job_until makes, over real HTTP to the served app."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", headers=AUTH)


def _video_id(base: str, title: str) -> int:
    jobs = httpx.get(f"{base}/jobs", params={"state": "ready"}, headers=AUTH).json()["data"]
    return next(j["video_id"] for j in jobs if j["title"] == title)
