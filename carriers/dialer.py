"""An adapter with the ``dial(number, *, ring_timeout, on_call) -> Call`` shape the voice
channel's ``Dialer`` protocol uses (escalation/channels/voice.py), routing through carriers.

Errors keep the channel's classification: ``InvalidNumber`` and ``FraudRefused`` are
``ValueError`` (permanent), ``NoRouteAvailable`` is an ``OSError`` (retry later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from carriers.router import CarrierRouter, RoutedCall
from gateway.call import Call

logger = logging.getLogger(__name__)


@dataclass
class CarrierDialer:
    router: CarrierRouter
    on_routed: Callable[[RoutedCall], None] | None = None  # e.g. audit the attempts

    async def dial(
        self, number: str, *, ring_timeout: float, on_call: Callable[[Call], None]
    ) -> Call:
        routed = await self.router.place_call(number, ring_timeout=ring_timeout, on_call=on_call)
        if self.on_routed is not None:
            try:
                self.on_routed(routed)
            except Exception:
                logger.exception("on_routed hook failed")
        return routed.call
