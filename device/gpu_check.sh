#!/bin/bash
# renacerd on a real GPU: unpack BCC from the carried bundle (.debs/bcc-bundle.tar.xz, made
# by device/make_bundle.sh), link Debian's 6.1 headers where BCC looks, then trace a small
# PyTorch training loop and check launches, kernel names, copies and allocations per step
# and the traced/untraced step-time ratio. Report: stdout and $OUT/gpu_report.txt.
# Run from the repository root:  bash device/gpu_check.sh   (as root; < 5 minutes)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/renacerd-gpu}
mkdir -p "$OUT"
REPORT="$OUT/gpu_report.txt"
say() { echo "$*" | tee -a "$REPORT.pre"; }
fail() { say "FAIL: $*"; cat "$REPORT.pre" > "$REPORT"; exit 1; }
: > "$REPORT.pre"

say "== machine"
say "$(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-unknown OS}") kernel $(uname -r) arch $(uname -m)"
command -v nvidia-smi >/dev/null && say "$(nvidia-smi -L 2>&1 | head -2)"
PY=/opt/torch/.venv/bin/python3
[ -x "$PY" ] || PY=$(command -v python3)
say "python $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1)"
[ "$(id -u)" = 0 ] || fail "needs root (BPF)"

say "== BCC from the bundle"
BUNDLE="$REPO/.debs/bcc-bundle.tar.xz"
[ -f "$BUNDLE" ] || fail "$BUNDLE missing: run device/make_bundle.sh on the Debian machine and carry .debs"
B=/opt/renacerd-bcc
rm -rf "$B" && mkdir -p "$B"
if ! tar -xJf "$BUNDLE" -C "$B" 2>/dev/null; then
    "$PY" -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$BUNDLE" "$B" \
        || fail "cannot unpack $BUNDLE"
fi
mkdir -p "$B/py"
for w in "$B"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$B/py" || fail "cannot unpack $w"; done
export LD_LIBRARY_PATH="$B/root/usr/lib/x86_64-linux-gnu:$B/root/lib/x86_64-linux-gnu:$B/root/usr/lib/llvm-14/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$REPO:$B/py:$B/root/usr/lib/python3/dist-packages"
# BCC compiles against /lib/modules/$(uname -r)/{build,source}: Debian's 6.1 headers (the
# programs use tracepoints, uprobes and pt_regs only, no kernel structs)
K=/lib/modules/$(uname -r)
HB="$B/root/usr/src/linux-headers-6.1.0-56-amd64"
HS="$B/root/usr/src/linux-headers-6.1.0-56-common"
if [ -e "$K/build/include" ]; then
    say "using the machine's own headers in $K/build"
elif mkdir -p "$K" 2>/dev/null && ln -sfn "$HB" "$K/build" && ln -sfn "$HS" "$K/source"; then
    say "linked $K/build -> Debian 6.1 headers"
else
    fail "cannot create $K/build (read-only /lib/modules?): BCC has no headers to compile with"
fi
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null
"$PY" -c "from bcc import BPF; BPF(text=b'int f(void *c) { return 0; }'); print('bcc ok')" \
    2>&1 | tail -3 | tee -a "$REPORT.pre" | grep -q "bcc ok" \
    || fail "BCC does not load here (see above): libraries, headers or kernel BPF support"

say "== untraced run"
STEPS=${STEPS:-40}
timeout 120 "$PY" "$REPO/device/gpu_train.py" "$STEPS" "$OUT/untraced_steps.json" \
    || fail "the training loop fails untraced"

say "== traced run"
timeout 300 "$PY" "$REPO/device/gpu_trace_run.py" "$REPO" "$PY" "$STEPS" \
    "$OUT/untraced_steps.json" "$OUT"
rc=$?
cat "$REPORT.pre" "$REPORT" > "$REPORT.all" 2>/dev/null && mv "$REPORT.all" "$REPORT"
rm -f "$REPORT.pre"
exit $rc
