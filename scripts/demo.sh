#!/usr/bin/env bash
# Install everything, trace the bundled demo training loop, and show what was captured.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RENACER_DB=${RENACER_DB:-/var/lib/renacer/traces.db}
run="demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/renacerd --run "$run" -- .venv/bin/python examples/demo_train.py
.venv/bin/renacer show "$run"
.venv/bin/renacer show "$run" --by step
.venv/bin/renacer spans "$run"
