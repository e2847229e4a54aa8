#!/usr/bin/env bash
# Install everything, then run the whole test suite (as root, so the BPF tests run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# What only the tests need: the framework integrations are tested against the real
# libraries (torch 2.13.0 installs from the machine's local CPU wheel), and the client
# bench compares with the OpenTelemetry SDK.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 transformers accelerate \
    lightning opentelemetry-sdk
if [ -x scripts/clickhouse.sh ]; then bash scripts/clickhouse.sh start || true; fi
.venv/bin/ruff check renacerd tests bench
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ -x scripts/clickhouse.sh ]; then bash scripts/clickhouse.sh stop || true; fi
exit $rc
