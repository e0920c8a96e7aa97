"""Imports the service once, then forks API servers and `indexer` commands on request (fast kill -9 restarts).

Run as `python tests/app/fork_server.py`; it prints {"ready": true}, then reads one JSON request per line
on stdin and answers {"pid": N} for each child it forks:
  {"kind": "api", "port": 8000, "env": {...}, "log": "/path", "fsize": null}
  {"kind": "indexer", "args": ["worker", ...], "env": {...}, "log": "/path", "fsize": 65536}
`fsize` sets RLIMIT_FSIZE (bytes) in the child: writes past that offset fail with EFBIG (Python ignores
SIGXFSZ), which is how a full disk is simulated even for root. Children are reaped automatically; stop
them with os.kill(pid, ...). Importing torch and open_clip takes seconds; forking the loaded process
takes milliseconds, so a test can kill and restart the service many times.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _child(request: dict[str, Any]) -> int:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.environ.update(request.get("env", {}))
    if request.get("fsize") is not None:
        limit = int(request["fsize"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if request["kind"] == "api":
        import uvicorn

        from app.main import create_app
        from app.settings import Settings

        app = create_app(Settings())
        uvicorn.run(app, host="127.0.0.1", port=int(request["port"]), log_level="warning")
        return 0
    from indexer.cli import main

    return int(main(request["args"]))


def main() -> None:
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    # Everything slow to import, before any thread exists (forking a process with threads is unsafe).
    import av  # noqa: F401
    import open_clip  # noqa: F401
    import uvicorn  # noqa: F401

    import app.main  # noqa: F401
    import indexer.cli  # noqa: F401
    import indexer.worker  # noqa: F401
    import model.video  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            except BaseException as e:  # the child must never fall back into this loop
                print(f"fork_server child failed: {e!r}", file=sys.stderr, flush=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    main()
