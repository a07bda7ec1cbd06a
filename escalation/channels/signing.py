"""HMAC signing shared by the email one-click ack links and the signed webhook POSTs.

Both kinds of signature are keyed by an operator secret and carry their own expiry so a
leaked link or a captured request stops working on its own. Webhooks use Stripe's exact
scheme (HMAC-SHA256 over `<ts>.<body>`) so receivers can verify with a few lines in any
language; ack tokens MAC a message that starts with a fixed label, never with digits, so a
value signed for one purpose cannot verify as the other even under one shared secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

__all__ = [
    "SIGNATURE_HEADER",
    "WEBHOOK_TOLERANCE_S",
    "sign_ack",
    "sign_webhook",
    "verify_ack",
    "verify_webhook",
]

SIGNATURE_HEADER = "X-Ackline-Signature"
WEBHOOK_TOLERANCE_S = 300  # replay window, as Stripe's default

_ACK_LABEL = b"ackline-ack-v1\x00"


def _mac(secret: str | bytes, message: bytes) -> bytes:
    if not secret:
        raise ValueError("signing secret must not be empty")
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, message, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _ack_message(alert_id: str, expires_at: int) -> bytes:
    return _ACK_LABEL + f"{alert_id}\x00{expires_at}".encode()


def sign_ack(alert_id: str, secret: str | bytes, expires_at: int) -> str:
    """URL-safe token `<alert id>.<expiry unix s>.<mac>` for a one-click ack link."""
    mac = _mac(secret, _ack_message(alert_id, expires_at))
    return f"{_b64(alert_id.encode())}.{expires_at}.{_b64(mac)}"


def verify_ack(token: str, secret: str | bytes, now: float) -> str | None:
    """The alert id if `token` is authentic and not expired at `now` (unix s), else None."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    try:
        alert_id = _unb64(parts[0]).decode()
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        return None
    expires_at = int(parts[1])
    expected = _mac(secret, _ack_message(alert_id, expires_at))
    if not hmac.compare_digest(mac, expected) or now > expires_at:
        return None
    return alert_id


def _webhook_mac(body: bytes, secret: str | bytes, timestamp: int) -> str:
    return _mac(secret, f"{timestamp}.".encode() + body).hex()


def sign_webhook(body: bytes, secret: str | bytes, timestamp: int) -> str:
    """`X-Ackline-Signature` value `t=<ts>,v1=<hex>`: HMAC-SHA256 over `<ts>.<raw body>`."""
    return f"t={timestamp},v1={_webhook_mac(body, secret, timestamp)}"


def verify_webhook(
    header: str | None,
    body: bytes,
    secret: str | bytes,
    now: float,
    tolerance_s: int = WEBHOOK_TOLERANCE_S,
) -> bool:
    """Receiver side: any `v1` matches and `t` is within the replay window of `now`.

    Several `v1` entries are allowed so a sender can sign with an old and a new secret
    during a rotation, as Stripe does.
    """
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or abs(now - timestamp) > tolerance_s:
        return False
    expected = _webhook_mac(body, secret, timestamp)
    return any(hmac.compare_digest(c.encode(), expected.encode()) for c in candidates)
