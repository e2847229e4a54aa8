#!/usr/bin/env bash
# Install everything renacerd needs on Debian 12, as root: BCC, kernel headers BCC can
# compile against, tracefs, a venv with the package. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root (apt-get, /lib/modules, tracefs)" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
PKGS="python3 python3-venv python3-dev python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64 gcc libc6-dev make strace git xz-utils bpftool chromium systemd util-linux"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install.sh: apt-get install$missing"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# BCC compiles BPF C at load time against /lib/modules/$(uname -r)/build. Kernels without a
# headers package (and without CONFIG_IKHEADERS) get Debian's newest headers linked in:
# build -> linux-headers-*-amd64, source -> linux-headers-*-common (both are needed).
KREL=$(uname -r)
MOD=/lib/modules/$KREL
if [ ! -e "$MOD/build/include/generated/autoconf.h" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$hdr" ] || [ -z "$common" ]; then
        echo "install.sh: no linux-headers-*-amd64 in /usr/src" >&2
        exit 1
    fi
    mkdir -p "$MOD"
    ln -sfn "$hdr" "$MOD/build"
    ln -sfn "$common" "$MOD/source"
    echo "install.sh: linked $MOD/build -> $hdr (running kernel $KREL has no headers package)"
fi

if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
if [ ! -d /sys/kernel/tracing/events ] && [ -d /sys/kernel/debug ]; then
    mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
fi

# The venv sees the distribution's bcc (python3-bpfcc installs into /usr/lib/python3).
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
# -e builds renacerd/_hot.c in place (setup.py; python3-dev has its headers)
.venv/bin/pip install -q --disable-pip-version-check -e ".[daemon,test]" ${RENACER_EXTRA_PIP:-}
getent group renacer >/dev/null || groupadd --system renacer
echo "install.sh: ok ($(.venv/bin/renacerd doctor --brief 2>&1 | tail -n 1))"
