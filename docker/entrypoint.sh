#!/bin/sh
# Container entry point: refuse to start with a data directory this user cannot write (the usual cause is
# a host bind mount owned by another uid), then exec the command so that it receives signals directly.
set -eu

data_dir="${TVS_DATA_DIR:-/data}"
if ! mkdir -p "$data_dir" 2>/dev/null || ! [ -w "$data_dir" ]; then
    echo "tvs-entrypoint: the data directory $data_dir is not writable by uid $(id -u) gid $(id -g)." >&2
    echo "  Use a named volume (docker-compose.yml does), or on the host: chown -R $(id -u):$(id -g) <dir>" >&2
    exit 70
fi

exec "$@"
