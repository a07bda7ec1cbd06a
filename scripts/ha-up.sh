#!/usr/bin/env bash
# Starts the high-availability topology on this machine (bench/ha.py): PostgreSQL primary +
# synchronous standby under pg_auto_failover, Redis + replica + three Sentinels, two SIPp
# carriers, two complete ackline nodes and HAProxy in front, all on loopback ports, data
# and logs in ${ACKLINE_HA_DIR:-var/ha}. Leaves them running; `make ha-down` stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m bench.ha up --workdir "${ACKLINE_HA_DIR:-var/ha}" "$@"
