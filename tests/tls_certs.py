"""Throw-away TLS certificates for tests, made with the ``openssl`` CLI in a temp directory.

Nothing here is committed: each test run makes its own CA and server certificate (for
127.0.0.1 and ``localhost``), so no private key ever lives in the repository.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = "openssl"


@dataclass(frozen=True)
class PkiFiles:
    """One CA and a certificate it signed; ``bundle`` is the cert then its key (baresip)."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    bundle: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def require_openssl() -> None:
    if shutil.which(OPENSSL) is None:
        pytest.skip("openssl is not installed: run scripts/install-system-deps.sh")


def make_pki(directory: Path, name: str = "server", cn: str = "localhost") -> PkiFiles:
    """A fresh CA plus a certificate for ``cn``, 127.0.0.1 and localhost (EC P-256, 1 day)."""
    require_openssl()
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(
        f"subjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "1",
         "-subj", f"/CN=ackline test CA {name}", cwd=directory)  # fmt: skip
    _run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}", cwd=directory)
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext),
         cwd=directory)  # fmt: skip
    bundle = directory / f"{name}-bundle.pem"
    bundle.write_text(cert.read_text() + key.read_text())
    return PkiFiles(ca_cert, ca_key, cert, key, bundle)
