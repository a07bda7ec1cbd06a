"""TLS settings for SIP over TLS (RFC 3261 section 26, RFC 5630): contexts and error texts.

Pure configuration: the sockets are :mod:`gateway.transport`'s. Certificate verification
is on unless a trunk explicitly turns it off, because SDES SRTP keys travel inside the
signalling and TLS without verification hands them to whoever answers the connection.
Contexts are built per connection (cheap next to a handshake) so a renewed certificate
file is picked up by the next connection without a restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from gateway.result import FailureCause

__all__ = [
    "DEFAULT_SIPS_PORT",
    "TLS_HANDSHAKE_TIMEOUT",
    "TlsClientSettings",
    "TlsServerSettings",
    "describe_tls_error",
]

DEFAULT_SIPS_PORT = 5061
# A handshake that has not finished after this long is given up (both directions).
TLS_HANDSHAKE_TIMEOUT = 5.0


def _readable(path: Path | None, what: str) -> None:
    if path is not None and not path.is_file():
        raise ValueError(f"{what} {path} is not a readable file")


@dataclass(frozen=True)
class TlsClientSettings:
    """How we connect to a TLS peer: whom we trust and who we are.

    ``ca_file`` None trusts the system's CAs; ``server_name`` is the name checked against
    the peer's certificate (and sent as SNI), by default the target URI's host.
    """

    ca_file: Path | None = None
    verify: bool = True
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("tls.client_key needs tls.client_cert")

    def check_files(self) -> None:
        """ValueError naming the first configured file that cannot be read."""
        _readable(self.ca_file, "tls.ca_file")
        _readable(self.client_cert, "tls.client_cert")
        _readable(self.client_key, "tls.client_key")

    def context(self) -> ssl.SSLContext:
        """A client context; raises OSError/ssl.SSLError for unreadable or bad files."""
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            key = str(self.client_key) if self.client_key is not None else None
            context.load_cert_chain(str(self.client_cert), key)
        return context


@dataclass(frozen=True)
class TlsServerSettings:
    """Our TLS listener's certificate; ``client_ca_file`` makes client certificates
    mandatory and checked against it (mutual TLS with a carrier)."""

    cert_file: Path
    key_file: Path | None = None  # None: the key is in cert_file
    client_ca_file: Path | None = None

    def check_files(self) -> None:
        _readable(self.cert_file, "TLS certificate")
        _readable(self.key_file, "TLS key")
        _readable(self.client_ca_file, "TLS client CA file")

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        key = str(self.key_file) if self.key_file is not None else None
        context.load_cert_chain(str(self.cert_file), key)
        if self.client_ca_file is not None:
            context.load_verify_locations(cafile=str(self.client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def tls_failure_cause(exc: BaseException) -> FailureCause:
    """What kind of failure `describe_tls_error` describes, for call results."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return FailureCause.TLS_CERTIFICATE
    if isinstance(exc, ssl.SSLError):
        return FailureCause.TLS_HANDSHAKE
    return FailureCause.CONNECT


def describe_tls_error(exc: BaseException) -> str:
    """A one-line reason for a failed TLS connection, for call results and logs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return f"TLS certificate verification failed: {detail}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "TLS connect/handshake timed out"
    return f"{type(exc).__name__}: {exc}"
