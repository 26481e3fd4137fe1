#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests and benchmarks: a real server in a
# temporary directory, never a mock.
#
#   scripts/postgres.sh start [DIR]        start a server (in a new temporary directory
#                                          unless DIR is given); print its settings
#   scripts/postgres.sh ensure DIR         the same, but reuse the server already running
#                                          in DIR (safe when many test processes ask at once)
#   scripts/postgres.sh stop DIR [MODE]    stop it (MODE: fast, the default, or immediate,
#                                          which is a crash: no checkpoint, WAL recovery on
#                                          the next start)
#   scripts/postgres.sh remove DIR         stop it and delete DIR
#
# `start` and `ensure` print shell assignments on stdout, e.g.
#   CARETWIN_TEST_PG_URL=postgres://caretwin@127.0.0.1:54321/postgres
#   CARETWIN_TEST_PG_DIR=/tmp/caretwin-pg.XXXX
# so `eval "$(scripts/postgres.sh start)"` sets both. The server listens on 127.0.0.1
# and on a unix socket in DIR, on a free port, with trust authentication for the local
# superuser `caretwin`: for tests on this machine only.
#
# PostgreSQL comes from Debian's packages, installed when missing (as root). PostgreSQL
# refuses to run as root, so as root the server runs as the `postgres` user the package
# creates.
set -euo pipefail

log() { printf 'postgres.sh: %s\n' "$*" >&2; }

find_bin() {
    local dir
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
        return
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return
        fi
    done
    return 1
}

pg_bin() {
    local bin
    if bin=$(find_bin); then
        echo "$bin"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        log "PostgreSQL is not installed; run as root or: apt-get install -y postgresql"
        exit 1
    fi
    log "installing PostgreSQL from the Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends postgresql >&2
    find_bin
}

# Runs a command as the server's owner: `postgres` when we are root, else ourselves.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

settings() {
    local dir=$1 port
    port=$(cat "$dir/port")
    echo "CARETWIN_TEST_PG_URL=postgres://caretwin@127.0.0.1:$port/postgres"
    echo "CARETWIN_TEST_PG_DIR=$dir"
}

running() {
    local dir=$1 bin
    bin=$(pg_bin)
    [ -f "$dir/port" ] && as_owner "$bin/pg_ctl" status -D "$dir/data" >/dev/null 2>&1
}

start() {
    local dir=$1 bin port tries
    bin=$(pg_bin)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
        chmod 0755 "$dir"
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$dir/data" -U caretwin -A trust -E UTF8 --locale=C \
            --no-sync >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    # A previous crash (stop immediate) leaves the port in the directory: keep it, so the
    # URL callers hold stays valid. Otherwise pick a free one; a port taken between the
    # pick and the bind makes pg_ctl fail, and another is tried.
    for tries in 1 2 3 4 5 6 7 8 9 10; do
        if [ -f "$dir/port" ]; then
            port=$(cat "$dir/port")
        else
            port=$((20000 + RANDOM % 40000))
        fi
        if as_owner "$bin/pg_ctl" start -w -t 60 -D "$dir/data" -l "$dir/server.log" \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=64MB" \
            >/dev/null 2>&1 9>&-; then
            echo "$port" >"$dir/port"
            return
        fi
        if [ -f "$dir/port" ] && [ "$tries" -ge 3 ]; then
            rm -f "$dir/port"
        fi
    done
    log "the server in $dir did not start; its log:"
    tail -n 30 "$dir/server.log" >&2 || true
    exit 1
}

stop() {
    local dir=$1 mode=${2:-fast} bin
    bin=$(pg_bin)
    if [ -f "$dir/data/PG_VERSION" ]; then
        as_owner "$bin/pg_ctl" stop -w -t 60 -m "$mode" -D "$dir/data" >/dev/null 2>&1 || true
    fi
}

cmd=${1:-}
case "$cmd" in
start)
    dir=${2:-$(mktemp -d "${TMPDIR:-/tmp}/caretwin-pg.XXXXXX")}
    if running "$dir"; then
        log "a server is already running in $dir"
    else
        start "$dir"
    fi
    settings "$dir"
    ;;
ensure)
    dir=${2:?usage: postgres.sh ensure DIR}
    mkdir -p "$dir"
    # One caller at a time decides whether to start the server (the server itself does
    # not inherit the lock: start closes descriptor 9 for it).
    exec 9>"$dir.lock"
    flock 9
    running "$dir" || start "$dir"
    settings "$dir"
    ;;
stop)
    stop "${2:?usage: postgres.sh stop DIR [fast|immediate]}" "${3:-fast}"
    ;;
remove)
    dir=${2:?usage: postgres.sh remove DIR}
    stop "$dir" fast
    rm -rf "$dir" "$dir.lock"
    ;;
*)
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
