#!/usr/bin/env bash
# Installs the system packages ackline and its tests need, only when they are missing.
set -euo pipefail

need=()
# a C compiler and the Python headers: `pip install` builds the native RTP sender
# (gateway/media/_rtpsend.c, see setup.py)
command -v gcc >/dev/null && command -v make >/dev/null || need+=(build-essential)
py=$(command -v python3.11 || command -v python3)
pyinc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if [ ! -e "$pyinc/Python.h" ]; then
    if apt-cache show python3.11-dev >/dev/null 2>&1; then need+=(python3.11-dev); else need+=(python3-dev); fi
fi
command -v sipp >/dev/null || need+=(sip-tester)
command -v haproxy >/dev/null || need+=(haproxy)
# `docker compose config` checks docker-compose.yml; Debian's v1 does when the plugin is absent
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
    || need+=(docker-compose)
command -v baresip >/dev/null || need+=(baresip)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v sox >/dev/null || need+=(sox)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
# pg_auto_failover (tests/integration/test_ha_postgres.py): the monitor's extension is built
# for one server major, so take the one matching the newest installed server (15 on bookworm)
command -v pg_autoctl >/dev/null || need+=(pg-auto-failover-cli)
pg_major=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
[ -e "/usr/share/postgresql/${pg_major:-15}/extension/pgautofailover.control" ] \
    || need+=("postgresql-${pg_major:-15}-auto-failover")
command -v chromium >/dev/null || need+=(chromium)  # the browser softphone's headless test
# a registrar for the registering-trunk tests (tests/integration/test_registration_kamailio.py)
command -v kamailio >/dev/null || need+=(kamailio)
# its tls module: registration over TLS (tests/integration/test_registration_kamailio_tls.py)
[ -e /usr/lib/x86_64-linux-gnu/kamailio/modules/tls.so ] || need+=(kamailio-tls-modules)
# test certificates for SIP over TLS (tests/tls_certs.py)
command -v openssl >/dev/null || need+=(openssl)

if ((${#need[@]})); then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "installing system packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
    # The tests run their own Kamailio on a loopback port; the packaged service (port 5060 on
    # every address, the example configuration) is not wanted running.
    if [[ " ${need[*]} " == *" kamailio "* ]] && command -v systemctl >/dev/null; then
        $SUDO systemctl disable --now kamailio >/dev/null 2>&1 || true
    fi
fi
