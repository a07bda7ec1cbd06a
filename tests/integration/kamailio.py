"""Kamailio (the Debian package) as a registrar for tests: its own config in a temporary
directory, on a loopback port, in the foreground as a child of the test, no database.
Given a certificate (tests/tls_certs.py) it listens for SIP over TLS as well (its tls
module, Debian package kamailio-tls-modules)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.ports import free_port, listening
from tests.integration.peers import wait_until
from tests.tls_certs import PkiFiles

CONFIG = Path(__file__).parent / "kamailio" / "registrar.cfg"
TLS_CONFIG = Path(__file__).parent / "kamailio" / "tls.cfg"
MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")


@dataclass
class Kamailio:
    process: subprocess.Popen[bytes]
    port: int
    ctl: Path
    log: Path
    tls_port: int | None = None  # listening for SIP over TLS too (given a certificate)

    def rpc(self, *command: str) -> str:
        """One kamcmd command over the control socket (e.g. ``ul.dump``)."""
        done = subprocess.run(
            ["kamcmd", "-s", f"unix:{self.ctl}", *command],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return done.stdout

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def kamailio(
    workdir: Path, *, user: str, password: str, min_expires: int, tls: PkiFiles | None = None
) -> Iterator[Kamailio]:
    """A running Kamailio registrar (with ``tls``, also on a TLS port presenting that
    certificate); stopped (and waited for) on exit."""
    if shutil.which("kamailio") is None:
        raise RuntimeError("kamailio is not installed: run `make test` (installs kamailio)")
    if tls is not None and not (MODULES / "tls.so").exists():
        raise RuntimeError("kamailio's tls module is missing: run scripts/install-system-deps.sh")
    port = free_port()
    tls_port = free_port() if tls is not None else None
    ctl = workdir / "kamailio_ctl"
    values = {
        "PORT": str(port), "MODULES": str(MODULES), "CTL": str(ctl), "USER": user,
        "PASSWORD": password, "MIN_EXPIRES": str(min_expires),
    }  # fmt: skip
    defines: list[str] = []
    if tls is not None:
        tls_config = workdir / "tls.cfg"
        tls_config.write_text(
            TLS_CONFIG.read_text().replace("@CERT@", str(tls.cert)).replace("@KEY@", str(tls.key))
        )
        values |= {"TLS_PORT": str(tls_port), "TLS_CONFIG": str(tls_config)}
        defines = ["-A", "WITH_TLS"]
    text = CONFIG.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    config = workdir / "kamailio.cfg"
    config.write_text(text)
    log = workdir / "kamailio.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["kamailio", "-f", str(config), "-DD", "-E", "-Y", str(workdir),
             "-m", "32", "-M", "4", *defines],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=workdir,
        )  # fmt: skip
    run = Kamailio(process, port, ctl, log, tls_port)
    try:
        wait_until(
            lambda: (
                (
                    listening(port, "udp")
                    and (tls_port is None or listening(tls_port, "tcp"))
                    and ctl.exists()
                )
                or process.poll() is not None
            ),
            10,
            "kamailio to listen",
        )
        if process.poll() is not None:
            raise RuntimeError(f"kamailio exited at start:\n{run.logs()}")
        yield run
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
