#!/usr/bin/env bash
# Install Debian packages that are missing, quietly, for CI and scripts/validate_deploy.sh.
#   scripts/apt_install.sh [--no-install-recommends] PACKAGE...
# Exit: 0 all installed (or already there); 1 apt-get failed for another reason (the log is printed);
#       3 the package registry is unreachable; 4 not root, or no apt-get on this machine.
set -uo pipefail

opts=()
if [ "${1:-}" = "--no-install-recommends" ]; then
    opts+=("$1")
    shift
fi
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt_install: no apt-get here; install ${missing[*]} with this system's package manager" >&2
    exit 4
fi
if [ "$(id -u)" != 0 ]; then
    echo "apt_install: not root; run: sudo apt-get install ${missing[*]}" >&2
    exit 4
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "apt_install: installing ${missing[*]}"
# apt-get update reports an unreachable mirror as a warning and exits 0; the install then fails.
apt-get update -qq >"$log" 2>&1
if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${opts[@]}" "${missing[@]}" >>"$log" 2>&1; then
    exit 0
fi
if grep -qiE "temporary failure resolving|could not resolve|failed to fetch|unable to connect|could not connect|network is unreachable|connection (timed out|refused|failed)" "$log"; then
    echo "apt_install: the Debian package registry is unreachable; ${missing[*]} not installed:" >&2
    grep -iE "resolv|fetch|connect|unreachable" "$log" | head -3 >&2
    exit 3
fi
echo "apt_install: apt-get install ${missing[*]} failed:" >&2
tail -20 "$log" >&2
exit 1
