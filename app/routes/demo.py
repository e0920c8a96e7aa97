"""GET /: the demo page (plain HTML, CSS and JavaScript from app/static, no build step), and its examples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel

from app.deps import READ_PROBLEMS, ReadAccess, SettingsDep

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
EXAMPLES_FILE = "demo-examples.json"  # written into the data directory by `make demo` (app/demo.py)

router = APIRouter(tags=["demo"])


class DemoExample(BaseModel):
    query: str
    video_id: int | None = None  # the clip the query describes


class DemoExamples(BaseModel):
    examples: list[DemoExample]


@router.get("/", response_class=FileResponse, include_in_schema=False)
def demo_page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
    )


@router.get("/demo/examples", response_model=DemoExamples, dependencies=[ReadAccess], responses=READ_PROBLEMS)
def demo_examples(settings: SettingsDep) -> DemoExamples:
    """Example queries for the demo page: captions of clips in this library (none unless `make demo` wrote them)."""
    path = settings.data_dir / EXAMPLES_FILE
    try:
        data = json.loads(path.read_text())
        return DemoExamples(examples=[DemoExample(**e) for e in data["examples"]])
    except FileNotFoundError:
        return DemoExamples(examples=[])
    except (OSError, ValueError, TypeError, KeyError) as e:
        logger.warning("ignoring the unreadable demo examples file %s: %s", path, e)
        return DemoExamples(examples=[])
