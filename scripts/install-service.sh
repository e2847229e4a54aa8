#!/usr/bin/env bash
# Install renacerd as a systemd service (after scripts/install.sh), as root: the units, the
# renacer group, /var/lib/renacer (0750 root:renacer), store files 0640 root:renacer, and
# /usr/local/bin links to the venv's commands. Idempotent. Add users with:
#   usermod -aG renacer USER
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PREFIX=${PREFIX:-/usr/local}
UNITDIR=${UNITDIR:-/etc/systemd/system}
STATE=/var/lib/renacer

if [ "$(id -u)" -ne 0 ]; then
    echo "install-service.sh: must run as root" >&2
    exit 2
fi
if [ ! -x "$ROOT/.venv/bin/renacerd" ]; then
    echo "install-service.sh: $ROOT/.venv/bin/renacerd missing; run scripts/install.sh first" >&2
    exit 2
fi

getent group renacer >/dev/null || groupadd --system renacer
ln -sfn "$ROOT/.venv/bin/renacerd" "$PREFIX/bin/renacerd"
ln -sfn "$ROOT/.venv/bin/renacer" "$PREFIX/bin/renacer"

install -d -m 0750 -o root -g renacer "$STATE"
for f in "$STATE"/traces.db "$STATE"/traces.db-wal "$STATE"/traces.db-shm; do
    [ -e "$f" ] && chown root:renacer "$f" && chmod 0640 "$f"
done
install -d -m 0755 "$PREFIX/share/doc/renacer"
install -m 0644 docs/security.md docs/protocol.md "$PREFIX/share/doc/renacer/"

install -m 0644 systemd/renacerd.socket "$UNITDIR/renacerd.socket"
sed "s#/usr/local/bin/renacerd#$PREFIX/bin/renacerd#; s#file:///usr/share/doc#file://$PREFIX/share/doc#" \
    systemd/renacerd.service > "$UNITDIR/renacerd.service"
chmod 0644 "$UNITDIR/renacerd.service"
sed -i "s#file:///usr/share/doc#file://$PREFIX/share/doc#" "$UNITDIR/renacerd.socket"
systemd-analyze verify "$UNITDIR/renacerd.socket" "$UNITDIR/renacerd.service"

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now renacerd.socket renacerd.service
    echo "install-service.sh: renacerd.socket and renacerd.service enabled and started"
else
    echo "install-service.sh: units installed in $UNITDIR (systemd is not running here;" \
         "start with: systemctl enable --now renacerd.socket renacerd.service)"
fi
