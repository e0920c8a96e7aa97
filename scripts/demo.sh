#!/usr/bin/env bash
# `make demo`: generate a sample library, index it with the demo model, serve the API and the demo page.
# `make` has already created .venv and installed the project. Each step is skipped when already done
# (the library has a stamp; indexing skips files it has seen, by sha256), so a second run starts in seconds.
#
# Environment (defaults in brackets):
#   TVS_DATA_DIR   where the library, catalog, tokens and index go [data/demo]
#   TVS_MODEL      checkpoint directory or preset [the demo model, assets/demo-model: app/demo.py decides]
#   TVS_HOST       address to listen on [127.0.0.1]
#   TVS_PORT       port [8000]
#   VENV           the virtual environment [.venv]
# Every other TVS_* setting of the service (app/settings.py) applies too. Ctrl-C stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."

py="${VENV:-.venv}/bin/python"
if [ ! -x "$py" ]; then
    echo "demo: $py not found: run 'make demo' (it installs first) or 'make install'" >&2
    exit 2
fi
export TVS_DATA_DIR="${TVS_DATA_DIR:-data/demo}"
export TVS_HOST="${TVS_HOST:-127.0.0.1}"
export TVS_PORT="${TVS_PORT:-8000}"
# Extra arguments go to app/demo.py (e.g. --families 2 --prepare-only; --help lists them).
exec "$py" -m app.demo --data-dir "$TVS_DATA_DIR" --host "$TVS_HOST" --port "$TVS_PORT" "$@"
