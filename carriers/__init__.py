"""Carrier trunks: rotation, health checks, failover and the toll-fraud guard for outbound calls."""

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
