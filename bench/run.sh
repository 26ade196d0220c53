#!/usr/bin/env bash
# Throughput and latency of kubetask against Celery and Dramatiq on Redis, measured in one run.
# Needs redis-server (Debian package) and the bench extras; prints figures, asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
python3 -m venv .venv
.venv/bin/pip install -q -e '.[bench]'
exec .venv/bin/python bench/throughput.py "$@"
