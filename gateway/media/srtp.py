"""SRTP with SDES keying (RFC 4568 ``a=crypto``, RFC 3711) on top of libsrtp (pylibsrtp).

Only AES_CM_128_HMAC_SHA1_80 is offered or accepted: it is the suite every SDES peer
implements. The crypto itself is libsrtp's; this module parses and writes the SDP
attribute and pairs an outbound and an inbound libsrtp session per call.

SDES puts the keys in the SDP, so they are only as secret as the signalling: the gateway
sends them over TLS only, unless a trunk explicitly allows otherwise (`SrtpPolicy`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import secrets
from dataclasses import dataclass

import pylibsrtp

__all__ = [
    "SUITE",
    "CryptoAttribute",
    "SrtpError",
    "SrtpKeys",
    "SrtpMode",
    "SrtpPolicy",
    "SrtpStream",
]

SUITE = "AES_CM_128_HMAC_SHA1_80"
KEY_SALT_LENGTH = 30  # 16-byte master key + 14-byte master salt
_TAG = re.compile(r"[0-9]{1,9}")
_LIFETIME = re.compile(r"(2\^)?[0-9]{1,20}")


class SrtpError(ValueError):
    """An unusable a=crypto attribute, or an SRTP packet that failed authentication."""


class SrtpMode(enum.Enum):
    """A trunk's (or the inbound side's) use of SRTP."""

    REQUIRED = "required"  # RTP/SAVP with a=crypto; a call without SRTP fails
    OPTIONAL = "optional"  # RTP/AVP with a=crypto (RFC 4568 best effort): SRTP if answered
    OFF = "off"  # plain RTP; SRTP offers are refused

    @classmethod
    def from_yaml(cls, value: object) -> object:
        """YAML 1.1 reads an unquoted ``off`` as false: take that for ``off`` (a pydantic
        before-validator); anything else is left for the enum to accept or refuse."""
        return cls.OFF.value if value is False else value


@dataclass(frozen=True)
class SrtpPolicy:
    """A mode and whether SDES keys may travel over a transport without TLS."""

    mode: SrtpMode = SrtpMode.OFF
    allow_cleartext_keys: bool = False  # SDES keys readable by anyone on the path: lab only

    def mode_over(self, transport: str) -> SrtpMode:
        """The mode usable over ``transport``: off where keys would travel in clear."""
        if transport.lower() == "tls" or self.allow_cleartext_keys:
            return self.mode
        return SrtpMode.OFF

    def check(self, transport: str) -> None:
        """ValueError when SRTP is asked for over a transport that would expose its keys."""
        if self.mode is not SrtpMode.OFF and self.mode_over(transport) is SrtpMode.OFF:
            raise ValueError(
                f"srtp: {self.mode.value} sends SDES keys in the SIP message: over {transport} "
                "anyone on the path could read them; use transport tls (or allow cleartext keys)"
            )


@dataclass(frozen=True)
class CryptoAttribute:
    """One ``a=crypto:<tag> AES_CM_128_HMAC_SHA1_80 inline:<key||salt>`` line."""

    tag: int
    key_salt: bytes
    suite: str = SUITE

    @classmethod
    def generate(cls, tag: int = 1) -> CryptoAttribute:
        """A fresh random master key and salt (never reused across calls)."""
        return cls(tag, secrets.token_bytes(KEY_SALT_LENGTH))

    @classmethod
    def parse(cls, value: str) -> CryptoAttribute:
        """Parse an a=crypto value; SrtpError for other suites, MKIs, several keys or a
        key of the wrong length (we would not be able to decrypt what the peer sends)."""
        parts = value.split()
        if len(parts) < 3:
            raise SrtpError(f"a=crypto needs a tag, a suite and key parameters: {value!r}")
        tag_text, suite, key_params = parts[0], parts[1], parts[2]
        if not _TAG.fullmatch(tag_text):
            raise SrtpError(f"a=crypto tag is not a number: {tag_text!r}")
        if suite.upper() != SUITE:
            raise SrtpError(f"unsupported crypto suite {suite!r} (only {SUITE})")
        if ";" in key_params:
            raise SrtpError("several master keys in one a=crypto are not supported")
        method, _, info = key_params.partition(":")
        if method.lower() != "inline":
            raise SrtpError(f"unsupported key method {method!r} (only inline)")
        key_text, *options = info.split("|")
        for option in options:
            if ":" in option:
                raise SrtpError("a master key identifier (MKI) is not supported")
            if not _LIFETIME.fullmatch(option):
                raise SrtpError(f"bad key lifetime {option!r}")
        try:
            key_salt = base64.b64decode(key_text, validate=True)
        except (binascii.Error, ValueError):
            raise SrtpError("a=crypto key is not valid base64") from None
        if len(key_salt) != KEY_SALT_LENGTH:
            raise SrtpError(f"a=crypto key is {len(key_salt)} bytes, not {KEY_SALT_LENGTH}")
        if len(parts) > 3:
            raise SrtpError(f"session parameters are not supported: {' '.join(parts[3:])!r}")
        return cls(int(tag_text), key_salt, SUITE)

    def with_tag(self, tag: int) -> CryptoAttribute:
        """The same key under the tag of the offer line it answers (RFC 4568 7.1.2)."""
        return CryptoAttribute(tag, self.key_salt, self.suite)

    @property
    def value(self) -> str:
        """The attribute's value (what follows ``a=crypto:``)."""
        key = base64.b64encode(self.key_salt).decode("ascii")
        return f"{self.tag} {self.suite} inline:{key}"

    def __repr__(self) -> str:  # never print key material
        return f"CryptoAttribute(tag={self.tag}, suite={self.suite})"


def parse_crypto_lines(values: list[str]) -> list[CryptoAttribute]:
    """The usable a=crypto lines of a media section, in order; unusable ones skipped
    (RFC 4568 7.1.2: the answerer picks one it supports)."""
    usable = []
    for value in values:
        try:
            usable.append(CryptoAttribute.parse(value))
        except SrtpError:
            continue
    return usable


@dataclass(frozen=True)
class SrtpKeys:
    """The negotiated pair: ``local`` protects what we send, ``remote`` what we receive."""

    local: CryptoAttribute
    remote: CryptoAttribute


class SrtpStream:
    """libsrtp sessions of one call: protect outgoing RTP, unprotect incoming RTP/RTCP."""

    def __init__(self, keys: SrtpKeys) -> None:
        self.keys = keys
        profile = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
        self._tx = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=keys.local.key_salt,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                srtp_profile=profile,
            )
        )
        self._rx = pylibsrtp.Session(
            pylibsrtp.Policy(
                key=keys.remote.key_salt,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                srtp_profile=profile,
            )
        )

    def protect(self, packet: bytes) -> bytes:
        return bytes(self._tx.protect(packet))

    def unprotect(self, packet: bytes) -> bytes:
        """The RTP packet inside; SrtpError when it fails authentication or is a replay."""
        try:
            return bytes(self._rx.unprotect(packet))
        except pylibsrtp.Error as exc:
            raise SrtpError(f"SRTP packet rejected: {exc}") from None

    def protect_rtcp(self, packet: bytes) -> bytes:
        return bytes(self._tx.protect_rtcp(packet))

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        try:
            return bytes(self._rx.unprotect_rtcp(packet))
        except pylibsrtp.Error as exc:
            raise SrtpError(f"SRTCP packet rejected: {exc}") from None
