# A throwaway PostgreSQL server for CI; sourced by .ci/run (bash, set -euo pipefail).
#
#   ci_postgres_start  installs PostgreSQL when it is missing, starts a server on 127.0.0.1 under a
#                      temporary directory and exports DAGSTER_PG_HOST, _PORT, _USER, _PASSWORD and
#                      _DB: the variables the production instance (deploy/k8s/dagster.yaml) reads.
#   ci_postgres_stop   stops that server by its process id and removes the directory.
#
# The postmaster runs as a background child of this shell (the subshell and setpriv both exec, so
# $! is the postmaster's own PID): no pid file is needed to stop it and `wait` reaps it.

CI_PG_PID=""   # the postmaster
CI_PG_DIR=""   # data, socket and logs; removed by ci_postgres_stop

# The directory of initdb and postgres: on PATH, else Debian's /usr/lib/postgresql/<version>/bin.
_ci_pg_bindir() {
    local dir
    if dir="$(command -v initdb)" && command -v pg_ctl >/dev/null && command -v postgres >/dev/null; then
        dirname "$(readlink -f "$dir")"
        return 0
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" && -x "$dir/postgres" ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

# initdb and postgres refuse to run as root, and CI runs as root: there they run as Debian's
# `postgres` user (the package creates it), else as a system user made here.
_ci_pg_user() {
    if [[ "$(id -u)" != 0 ]]; then
        id -un
    elif id postgres >/dev/null 2>&1; then
        echo postgres
    else
        id gcmlm-pg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin gcmlm-pg
        echo gcmlm-pg
    fi
}

# A port nothing listens on now (a connect through bash's /dev/tcp fails). Should another process
# take it before the server binds, the server exits and ci_postgres_start tries another port.
_ci_pg_free_port() {
    local port
    while true; do
        port=$((20000 + RANDOM % 30000))
        if ! (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
}

# The state letter of a process (Z: exited, not yet reaped); nothing when there is no such process.
_ci_pg_state() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    stat="${stat##*) }"
    echo "${stat%% *}"
}

_ci_pg_running() {
    local state
    state="$(_ci_pg_state "$1")"
    [[ -n "$state" && "$state" != Z ]]
}

_ci_pg_ready() {
    PGPASSWORD="$DAGSTER_PG_PASSWORD" "$CI_PG_PSQL" -h 127.0.0.1 -p "$DAGSTER_PG_PORT" -U "$DAGSTER_PG_USER" \
        -d postgres -Atqc 'select 1' >/dev/null 2>&1
}

ci_postgres_start() {
    local bindir
    if ! bindir="$(_ci_pg_bindir)"; then
        echo "PostgreSQL not found: installing Debian's postgresql package" >&2
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
        bindir="$(_ci_pg_bindir)" || { echo "no initdb/pg_ctl/postgres after installing postgresql" >&2; return 1; }
    fi
    # psql checks that the server is up and creates the database (the package depends on the client).
    CI_PG_PSQL="$bindir/psql"
    [[ -x "$CI_PG_PSQL" ]] || CI_PG_PSQL="$(command -v psql)" || { echo "psql not found" >&2; return 1; }

    local user
    user="$(_ci_pg_user)"
    local as_user=()
    if [[ "$(id -u)" == 0 ]]; then
        as_user=(setpriv --reuid="$user" --regid="$user" --init-groups --)
    fi
    CI_PG_DIR="$(mktemp -d)"
    chown "$user" "$CI_PG_DIR"

    # A password login over TCP, as in production; a random password, given to initdb in a file.
    export DAGSTER_PG_HOST=127.0.0.1 DAGSTER_PG_USER=gcmlm DAGSTER_PG_DB=gcmlm
    DAGSTER_PG_PASSWORD="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    export DAGSTER_PG_PASSWORD
    printf '%s\n' "$DAGSTER_PG_PASSWORD" >"$CI_PG_DIR/pwfile"
    chown "$user" "$CI_PG_DIR/pwfile"
    # The commands run from the temp dir: the server's user may not be able to enter the checkout.
    if ! (cd "$CI_PG_DIR" && exec "${as_user[@]}" "$bindir/initdb" --pgdata="$CI_PG_DIR/data" \
            --username="$DAGSTER_PG_USER" --pwfile="$CI_PG_DIR/pwfile" --auth-host=scram-sha-256 \
            --auth-local=trust --encoding=UTF8 --no-locale) >"$CI_PG_DIR/initdb.log" 2>&1; then
        cat "$CI_PG_DIR/initdb.log" >&2
        return 1
    fi
    rm -f "$CI_PG_DIR/pwfile"

    local attempt tries
    for attempt in 1 2 3; do
        export DAGSTER_PG_PORT
        DAGSTER_PG_PORT="$(_ci_pg_free_port)"
        # TCP on 127.0.0.1 only; the socket in the temp dir (/var/run/postgresql may not exist or be
        # writable). fsync off: the data are thrown away.
        (cd "$CI_PG_DIR" && exec "${as_user[@]}" "$bindir/postgres" -D "$CI_PG_DIR/data" -p "$DAGSTER_PG_PORT" \
            -c listen_addresses=127.0.0.1 -c unix_socket_directories="$CI_PG_DIR" -c fsync=off) \
            >>"$CI_PG_DIR/server.log" 2>&1 &
        CI_PG_PID=$!
        for tries in $(seq 120); do
            _ci_pg_ready && break
            _ci_pg_running "$CI_PG_PID" || break
            sleep 0.5
        done
        _ci_pg_ready && break
        echo "PostgreSQL did not come up on port $DAGSTER_PG_PORT (attempt $attempt)" >&2
        ci_postgres_stop_server
    done
    if [[ -z "$CI_PG_PID" ]]; then
        tail -n 30 "$CI_PG_DIR/server.log" >&2
        return 1
    fi
    PGPASSWORD="$DAGSTER_PG_PASSWORD" "$CI_PG_PSQL" -h 127.0.0.1 -p "$DAGSTER_PG_PORT" -U "$DAGSTER_PG_USER" \
        -d postgres -qc "create database $DAGSTER_PG_DB" >/dev/null
    echo "PostgreSQL ($bindir) on 127.0.0.1:$DAGSTER_PG_PORT, pid $CI_PG_PID, run as $user, under $CI_PG_DIR" >&2
}

# Stop the postmaster by its PID: SIGINT is PostgreSQL's fast shutdown (ends the sessions, exits);
# SIGKILL if it is still there after 30 s.
ci_postgres_stop_server() {
    [[ -n "$CI_PG_PID" ]] || return 0
    kill -INT "$CI_PG_PID" 2>/dev/null || true
    local tries
    for tries in $(seq 60); do
        _ci_pg_running "$CI_PG_PID" || break
        sleep 0.5
    done
    if _ci_pg_running "$CI_PG_PID"; then
        echo "PostgreSQL (pid $CI_PG_PID) did not stop: killing it" >&2
        kill -KILL "$CI_PG_PID" 2>/dev/null || true
    fi
    wait "$CI_PG_PID" 2>/dev/null || true
    CI_PG_PID=""
}

ci_postgres_stop() {
    ci_postgres_stop_server
    if [[ -n "$CI_PG_DIR" ]]; then
        rm -rf "$CI_PG_DIR"
        CI_PG_DIR=""
    fi
}
