#!/usr/bin/env bash
# ClickHouse for the tests: install Debian's clickhouse-server if missing and run it on
# loopback (its packaged config listens on 127.0.0.1/::1:8123). No systemd needed: the
# server binary is started directly in the background. Idempotent.
#   scripts/clickhouse.sh [start]   install if needed, start unless /ping answers
#   scripts/clickhouse.sh stop      stop the server this script started
#   scripts/clickhouse.sh status    exit 0 when /ping answers
set -euo pipefail
PORT=${CLICKHOUSE_HTTP_PORT:-8123}
URL="http://127.0.0.1:$PORT/ping"
CONF=/etc/clickhouse-server/config.xml
PIDFILE=/run/renacer-clickhouse.pid
LOG=/var/log/clickhouse-server/renacer-start.log

ping_ok() { curl -fsS -m 2 "$URL" 2>/dev/null | grep -q '^Ok\.'; }

start() {
    if ping_ok; then echo "clickhouse.sh: already up on :$PORT"; return 0; fi
    if [ "$(id -u)" -ne 0 ]; then echo "clickhouse.sh: must run as root" >&2; exit 2; fi
    if [ ! -x /usr/sbin/clickhouse-server ] || ! command -v curl >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # the package's postinst cannot start a service without an init: that is fine here
        apt-get install -y -qq --no-install-recommends clickhouse-server curl >/dev/null
    fi
    id clickhouse >/dev/null 2>&1 || useradd --system --home-dir /var/lib/clickhouse \
        --shell /usr/sbin/nologin clickhouse
    install -d -o clickhouse -g clickhouse /var/lib/clickhouse /var/log/clickhouse-server
    # Run as the packaged service user (what the unit file does), detached from this shell.
    setsid setpriv --reuid=clickhouse --regid=clickhouse --init-groups \
        /usr/sbin/clickhouse-server --config-file="$CONF" >"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 120); do
        if ping_ok; then echo "clickhouse.sh: up on :$PORT (pid $(cat "$PIDFILE"))"; return 0; fi
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then break; fi
        sleep 0.5
    done
    echo "clickhouse.sh: server did not answer on $URL; last log lines:" >&2
    tail -n 20 "$LOG" /var/log/clickhouse-server/clickhouse-server.err.log >&2 2>/dev/null || true
    exit 1
}

stop() {
    [ -f "$PIDFILE" ] || { echo "clickhouse.sh: not started by this script"; return 0; }
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$PIDFILE"
    echo "clickhouse.sh: stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) ping_ok ;;
    *) echo "usage: clickhouse.sh [start|stop|status]" >&2; exit 2 ;;
esac
