#!/usr/bin/env bash
# Install everything, then run the whole test suite (as root, so the BPF tests run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ -x scripts/clickhouse.sh ]; then bash scripts/clickhouse.sh start || true; fi
.venv/bin/ruff check renacerd tests bench
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ -x scripts/clickhouse.sh ]; then bash scripts/clickhouse.sh stop || true; fi
exit $rc
