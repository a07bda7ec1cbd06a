"""Destination numbers: parse and normalise them, and refuse the ones that cost fraud money.

Every check here runs before any carrier is touched, so a bad or dangerous number never
becomes an INVITE. Toll fraud (international revenue share, premium-rate pumping) is the
classic way a compromised alerting config gets expensive; the guard is fail-closed: a
country must be explicitly allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import phonenumbers
from phonenumbers import PhoneNumberType

from carriers.trunk import check_countries

# Number types that have no business receiving an on-call alert and are the usual targets
# of revenue-share fraud. VOIP ("voip-special" ranges, e.g. UK 056) and voicemail access
# numbers are refused too: an alert must reach a person's phone, not a relay.
REFUSED_TYPES: frozenset[int] = frozenset(
    {
        PhoneNumberType.PREMIUM_RATE,
        PhoneNumberType.SHARED_COST,
        PhoneNumberType.UAN,
        PhoneNumberType.PERSONAL_NUMBER,
        PhoneNumberType.PAGER,
        PhoneNumberType.VOIP,
        PhoneNumberType.VOICEMAIL,
    }
)

_TYPE_NAMES = {
    value: name.lower()
    for name, value in vars(PhoneNumberType).items()
    if name.isupper() and isinstance(value, int)
}


def type_name(number_type: int) -> str:
    """``premium_rate``, ``mobile``...: phonenumbers' type constant as config-friendly text."""
    return _TYPE_NAMES.get(number_type, f"type_{number_type}")


def type_from_name(name: str) -> int:
    for value, text in _TYPE_NAMES.items():
        if text == name.strip().lower():
            return value
    known = ", ".join(sorted(_TYPE_NAMES.values()))
    raise ValueError(f"unknown number type {name!r} (one of {known})")


class InvalidNumber(ValueError):
    """The destination is not a valid, dialable phone number."""

    reason_code: ClassVar[str] = "invalid_number"  # what the voice channel records


class FraudRefused(ValueError):
    """The destination is valid but policy forbids calling it (country or number type).

    A ``ValueError`` because retrying cannot help: this number is not a usable target.
    """

    reason_code: ClassVar[str] = "fraud_refused"  # what the voice channel records

    def __init__(self, number: str, reason: str) -> None:
        super().__init__(f"refusing to call {number}: {reason}")
        self.number = number
        self.reason = reason


@dataclass(frozen=True)
class Destination:
    """A validated number: E.164 text, its country and its phonenumbers type."""

    e164: str
    region: str  # ISO 3166 alpha-2, e.g. "US"
    number_type: int  # phonenumbers.PhoneNumberType constant
    parsed: phonenumbers.PhoneNumber

    @property
    def type_name(self) -> str:
        return type_name(self.number_type)


def normalise(text: str, *, default_region: str | None = None) -> Destination:
    """Parse ``text`` (E.164, or national with ``default_region``) into a ``Destination``."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidNumber("empty phone number")
    raw = text.strip()
    if raw.startswith("tel:"):
        raw = raw[4:].split(";", 1)[0]
    if not raw.startswith("+") and default_region is None:
        raise InvalidNumber(f"{text!r} is not in E.164 form (+<country code><number>)")
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidNumber(f"cannot parse {text!r} as a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidNumber(f"{text!r} is not a valid phone number (unassigned range or length)")
    region = phonenumbers.region_code_for_number(parsed)
    if not region or region == "001":
        raise InvalidNumber(f"{text!r} belongs to no country (global service number)")
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return Destination(e164, region, phonenumbers.number_type(parsed), parsed)


class FraudGuard:
    """The deployment-wide policy: allowed countries and refused number types."""

    def __init__(
        self, allowed_countries: Iterable[str], *, refused_types: Iterable[int] = REFUSED_TYPES
    ) -> None:
        self.allowed_countries = frozenset(check_countries([c.upper() for c in allowed_countries]))
        if not self.allowed_countries:
            raise ValueError("allowed_countries must name at least one country (fail-closed)")
        self.refused_types = frozenset(refused_types)

    def check(self, destination: Destination) -> None:
        """Raise ``FraudRefused`` unless policy allows calling ``destination``."""
        if destination.region not in self.allowed_countries:
            allowed = ", ".join(sorted(self.allowed_countries))
            raise FraudRefused(
                destination.e164,
                f"country {destination.region} is not in allowed_countries ({allowed})",
            )
        if destination.number_type in self.refused_types:
            raise FraudRefused(
                destination.e164, f"{destination.type_name} numbers are refused (toll-fraud guard)"
            )
