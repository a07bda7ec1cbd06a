"""Carrier trunks: rotation, health checks, failover and the toll-fraud guard for outbound calls.

    config = load_carriers(Path("ackline.yaml"))          # the carriers: section
    router = config.router(gateway, on_health_change=audit)
    async with router.prober(interval=config.probe.interval):
        routed = await router.place_call("+14155550101", ring_timeout=25)
        # routed.call is the gateway Call (answered, or ended: busy/declined/no answer);
        # routed.attempts lists every trunk tried, in order, with outcome and SIP code.
    await router.close()

``InvalidNumber`` / ``FraudRefused`` are raised before any INVITE; ``NoRouteAvailable``
when no trunk is usable or every trunk failed as a carrier (its ``attempts`` say how).
"""

from carriers.config import CarrierConfig, CarrierConfigError, load_carriers
from carriers.health import HealthBoard, HealthChange, HealthPolicy, Prober
from carriers.numbers import Destination, FraudGuard, FraudRefused, InvalidNumber, normalise
from carriers.rotation import AttemptKind, QualityStats, make_strategy
from carriers.router import CarrierRouter, NoRouteAvailable, RoutedCall, TrunkAttempt
from carriers.trunk import NumberFormat, Trunk

__all__ = [
    "AttemptKind",
    "CarrierConfig",
    "CarrierConfigError",
    "CarrierRouter",
    "Destination",
    "FraudGuard",
    "FraudRefused",
    "HealthBoard",
    "HealthChange",
    "HealthPolicy",
    "InvalidNumber",
    "NoRouteAvailable",
    "NumberFormat",
    "Prober",
    "QualityStats",
    "RoutedCall",
    "Trunk",
    "TrunkAttempt",
    "load_carriers",
    "make_strategy",
    "normalise",
]
