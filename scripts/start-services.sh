#!/usr/bin/env bash
# Makes sure the PostgreSQL and Redis the tests use answer on 127.0.0.1, starting them (and,
# on a fresh Debian machine, creating the cluster and trusting loopback for the postgres
# role) only when they do not already answer. Idempotent; changes nothing when all is up.
set -euo pipefail

PG_PORT=${ACKLINE_PG_PORT:-5432}
REDIS_PORT=${ACKLINE_REDIS_PORT:-6379}
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "error: $what did not come up" >&2
    return 1
}

# -- Redis ---------------------------------------------------------------------------------
if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    echo "starting redis-server on 127.0.0.1:$REDIS_PORT"
    $SUDO mkdir -p /var/lib/redis /var/log/redis
    $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ackline-tests.log
    wait_for 10 "redis" redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
fi

# -- PostgreSQL ----------------------------------------------------------------------------
as_postgres() { $SUDO -u postgres "$@" 2>/dev/null || su postgres -c "$(printf '%q ' "$@")"; }

if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    cluster=$(pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port {print $1, $2; exit}')
    if [ -z "$cluster" ]; then
        name=main
        if [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then name=ackline; fi
        echo "creating PostgreSQL $version cluster '$name' on port $PG_PORT"
        $SUDO pg_createcluster --port "$PG_PORT" "$version" "$name" >/dev/null
        cluster="$version $name"
    fi
    read -r cversion cname <<<"$cluster"
    echo "starting PostgreSQL cluster $cversion/$cname"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$cversion" "$cname" start
    wait_for 30 "PostgreSQL" pg_isready -q -h 127.0.0.1 -p "$PG_PORT"
fi

if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -w -tAc "select 1" >/dev/null 2>&1
then
    # A fresh Debian cluster asks for a password over TCP; the tests connect as postgres
    # from loopback without one, as on the machines the suite was written for.
    hba=$(as_postgres psql -p "$PG_PORT" -tAc "show hba_file")
    echo "trusting loopback connections for role postgres in $hba"
    rules=$'host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust'
    $SUDO sh -c "{ printf '%s\n' \"\$1\"; cat \"\$2\"; } > \"\$2.new\" && cat \"\$2.new\" > \"\$2\" && rm \"\$2.new\"" _ "$rules" "$hba"
    as_postgres psql -p "$PG_PORT" -tAc "select pg_reload_conf()" >/dev/null
    wait_for 10 "PostgreSQL trust auth" \
        psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -w -tAc "select 1"
fi

if [ -z "$(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -w -tAc \
    "select 1 from pg_database where datname = 'test'")" ]; then
    echo "creating database 'test'"
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -w -qc "create database test"
fi
