#!/usr/bin/env bash
# Installs the runbooks runtime into a virtualenv: the Dockerfile's build steps, runnable without Docker.
#
#   scripts/install.sh [--system-deps] [--extras kubernetes] VENV
#
# --system-deps  apt-get installs what the runbooks run (needs root; the image does this): PostgreSQL
#                $PG_MAJOR client and server tools (pg_dump/pg_restore/psql; initdb/pg_ctl for restore drills and
#                PITR restores), redis-tools and redis-server (drills), zstd, and what building the package needs.
# --extras X     also the package's extra X and its pins (requirements-X.lock), e.g. kubernetes for the worker.
# VENV           a new virtualenv: the pinned tree (requirements.lock), then this package (not editable).
#
# The PostgreSQL binaries are linked into VENV/bin, so the venv's PATH finds the tools of the supported server
# version. Ends by running `runbooks --help`, `prefect version` and `pg_dump --version` from VENV.
# tests/test_packaging.py runs it (CI) into a fresh virtualenv; uv's cache (~/.cache/uv) is reused between runs.
set -euo pipefail

PG_MAJOR="${PG_MAJOR:-15}"  # the PostgreSQL version the runbooks are tested against (Debian 12's)
system_deps=0
extras=()
while [ $# -gt 0 ]; do
  case "$1" in
    --system-deps) system_deps=1; shift ;;
    --extras) extras+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: install.sh [--system-deps] [--extras NAME] VENV" >&2; exit 2; }
venv="$1"
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ "$system_deps" = 1 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    ca-certificates python3 python3-venv python3-dev gcc libc6-dev \
    "postgresql-$PG_MAJOR" "postgresql-client-$PG_MAJOR" redis-tools redis-server zstd >/dev/null
  rm -rf /var/lib/apt/lists/*
fi

pg_bin="/usr/lib/postgresql/$PG_MAJOR/bin"
[ -x "$pg_bin/pg_dump" ] || { echo "install.sh: no PostgreSQL $PG_MAJOR tools in $pg_bin (--system-deps installs them)" >&2; exit 1; }

python3 -m venv "$venv"
# uv at the version requirements-dev.lock pins, outside the venv (a build tool, not part of the runtime), installs
# the lock files: they are whole trees (tests/test_packaging.py checks it), so no resolver (--no-deps).
# UV_SYSTEM_CERTS: it trusts the system's certificate store, as pip does.
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$build/uv" \
  "$(grep '^uv==' "$root/requirements-dev.lock")"
export UV_SYSTEM_CERTS="${UV_SYSTEM_CERTS:-true}"
pip=("$build/uv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps)
# Byte-compiled, as pip does by default (the image's root filesystem is read-only); PIP_NO_COMPILE=1 skips it.
[ -n "${PIP_NO_COMPILE:-}" ] || pip+=(--compile-bytecode)
locks=(-r "$root/requirements.lock")
spec="$root"
if [ ${#extras[@]} -gt 0 ]; then
  for extra in "${extras[@]}"; do
    locks+=(-r "$root/requirements-$extra.lock")
  done
  spec="$root[$(IFS=,; echo "${extras[*]}")]"
fi
"${pip[@]}" "${locks[@]}"
# Then the package itself, built in a temporary copy so the source tree gets no build/ or egg-info.
mkdir "$build/src"
tar -C "$root" --exclude=./.venv --exclude=./.git --exclude=./.demo --exclude=./.bench --exclude=./build --exclude='*.so' --exclude='*.egg-info' -cf - . | tar -C "$build/src" -xf -
"${pip[@]}" "${spec/#$root/$build/src}"

for tool in "$pg_bin"/*; do
  ln -sf "$tool" "$venv/bin/$(basename "$tool")"
done

"$venv/bin/runbooks" --help >/dev/null
"$venv/bin/prefect" version >/dev/null
"$venv/bin/pg_dump" --version
