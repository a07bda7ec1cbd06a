"""The official `twilio` SDK, optionally pointed at another API endpoint.

Messaging (SMS) and Voice (the twilio trunk kind) build their clients here, so both can be
aimed at a regional edge, a proxy or a local server speaking Twilio's wire format.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twilio.http.http_client import TwilioHttpClient  # type: ignore[import-untyped]
from twilio.http.response import Response  # type: ignore[import-untyped]
from twilio.rest import Client  # type: ignore[import-untyped]

__all__ = ["RebasedHttpClient", "twilio_client"]


class RebasedHttpClient(TwilioHttpClient):  # type: ignore[misc]
    """Sends every SDK request to `api_base` instead of *.twilio.com.

    The HttpClient is the SDK's documented extension point; rewriting here keeps the SDK's
    own URL building, auth and error parsing in the path.
    """

    def __init__(self, api_base: str, timeout: float) -> None:
        super().__init__(timeout=timeout)
        base = urlsplit(api_base)
        self._scheme, self._netloc = base.scheme, base.netloc

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        target = urlsplit(url)._replace(scheme=self._scheme, netloc=self._netloc)
        return super().request(method, urlunsplit(target), *args, **kwargs)


def twilio_client(
    account_sid: str, auth_token: str, *, api_base: str | None = None, timeout: float = 10.0
) -> Client:
    """A blocking SDK client (run its calls in a worker thread)."""
    http = RebasedHttpClient(api_base, timeout) if api_base else TwilioHttpClient(timeout=timeout)
    return Client(account_sid, auth_token, http_client=http)
