"""Kamailio (the Debian package) as a registrar for tests: its own config in a temporary
directory, on a loopback port, in the foreground as a child of the test, no database."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.ports import free_port, listening
from tests.integration.peers import wait_until

CONFIG = Path(__file__).parent / "kamailio" / "registrar.cfg"
MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")


@dataclass
class Kamailio:
    process: subprocess.Popen[bytes]
    port: int
    ctl: Path
    log: Path

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
def kamailio(workdir: Path, *, user: str, password: str, min_expires: int) -> Iterator[Kamailio]:
    """A running Kamailio registrar; stopped (and waited for) on exit."""
    if shutil.which("kamailio") is None:
        raise RuntimeError("kamailio is not installed: run `make test` (installs kamailio)")
    port = free_port()
    ctl = workdir / "kamailio_ctl"
    values = {
        "PORT": str(port), "MODULES": str(MODULES), "CTL": str(ctl), "USER": user,
        "PASSWORD": password, "MIN_EXPIRES": str(min_expires),
    }  # fmt: skip
    text = CONFIG.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    config = workdir / "kamailio.cfg"
    config.write_text(text)
    log = workdir / "kamailio.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["kamailio", "-f", str(config), "-DD", "-E", "-Y", str(workdir),
             "-m", "32", "-M", "4"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=workdir,
        )  # fmt: skip
    run = Kamailio(process, port, ctl, log)
    try:
        wait_until(
            lambda: (listening(port, "udp") and ctl.exists()) or process.poll() is not None,
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
