"""Number normalisation, the toll-fraud guard and per-trunk request URIs.

Only fictional numbers: +1 415 555 01xx, and phonenumbers' own example numbers for other
countries and types.
"""

from __future__ import annotations

import json

import phonenumbers
import pytest
from phonenumbers import PhoneNumberType
from pydantic import ValidationError

from carriers.numbers import (
    REFUSED_TYPES,
    FraudGuard,
    FraudRefused,
    InvalidNumber,
    normalise,
    type_from_name,
    type_name,
)
from carriers.trunk import Trunk
from gateway.call import parse_target


def example(region: str, number_type: int) -> str:
    number = phonenumbers.example_number_for_type(region, number_type)
    assert number is not None, (region, number_type)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# -- normalise -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["+14155550101", "+1 415 555 0101", "+1 (415) 555-0101", "tel:+14155550101"]
)
def test_normalises_to_e164(text: str) -> None:
    destination = normalise(text)
    assert destination.e164 == "+14155550101"
    assert destination.region == "US"


def test_national_input_needs_a_default_region() -> None:
    with pytest.raises(InvalidNumber, match=r"E\.164"):
        normalise("(415) 555-0101")
    assert normalise("(415) 555-0101", default_region="US").e164 == "+14155550101"


@pytest.mark.parametrize(
    "text",
    ["", "   ", "+", "hello", "+1555", "+15550100", "+1415555010199999", "+999123456"],
)
def test_invalid_numbers_are_refused_clearly(text: str) -> None:
    with pytest.raises(InvalidNumber):
        normalise(text)


def test_invalid_number_is_a_value_error_with_the_input_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"\+15550100"):
        normalise("+15550100")  # 7 digits: not a valid NANP number


def test_type_names_round_trip() -> None:
    for number_type in REFUSED_TYPES:
        assert type_from_name(type_name(number_type)) == number_type
    assert type_name(PhoneNumberType.PREMIUM_RATE) == "premium_rate"
    with pytest.raises(ValueError, match="unknown number type"):
        type_from_name("expensive")


# -- fraud guard -------------------------------------------------------------------------


def test_guard_allows_listed_country_and_normal_types() -> None:
    guard = FraudGuard(["US", "gb"])
    guard.check(normalise("+14155550101"))
    guard.check(normalise(example("GB", PhoneNumberType.MOBILE)))
    guard.check(normalise(example("GB", PhoneNumberType.FIXED_LINE)))


def test_guard_refuses_countries_outside_the_list() -> None:
    guard = FraudGuard(["US"])
    with pytest.raises(FraudRefused, match="country DE is not in allowed_countries") as info:
        guard.check(normalise(example("DE", PhoneNumberType.MOBILE)))
    assert "DE" in info.value.reason


@pytest.mark.parametrize(
    ("region", "number_type"),
    [
        ("US", PhoneNumberType.PREMIUM_RATE),  # +1 900
        ("GB", PhoneNumberType.PREMIUM_RATE),
        ("FR", PhoneNumberType.SHARED_COST),
        ("GB", PhoneNumberType.UAN),
        ("GB", PhoneNumberType.PERSONAL_NUMBER),
        ("GB", PhoneNumberType.PAGER),
        ("GB", PhoneNumberType.VOIP),
        ("DE", PhoneNumberType.SHARED_COST),
        ("DE", PhoneNumberType.VOICEMAIL),
        ("FR", PhoneNumberType.PREMIUM_RATE),
    ],
)
def test_guard_refuses_fraud_prone_number_types(region: str, number_type: int) -> None:
    number = example(region, number_type)
    destination = normalise(number)
    assert destination.number_type == number_type
    guard = FraudGuard(["US", "GB", "DE", "FR"])
    with pytest.raises(FraudRefused, match=type_name(number_type)) as info:
        guard.check(destination)
    assert info.value.number == number


def test_us_premium_rate_fictional_number_is_refused() -> None:
    with pytest.raises(FraudRefused, match="premium_rate"):
        FraudGuard(["US"]).check(normalise("+19005550100"))


def test_refused_types_can_be_narrowed() -> None:
    voip = normalise(example("GB", PhoneNumberType.VOIP))
    FraudGuard(["GB"], refused_types={PhoneNumberType.PREMIUM_RATE}).check(voip)


def test_guard_is_fail_closed_and_validates_codes() -> None:
    with pytest.raises(ValueError, match="at least one country"):
        FraudGuard([])
    with pytest.raises(ValueError, match="XX"):
        FraudGuard(["US", "XX"])


# -- trunks ----------------------------------------------------------------------------------


def trunk(**values: object) -> Trunk:
    return Trunk.model_validate({"name": "t", "host": "127.0.0.1", "port": 5090, **values})


def test_request_uri_e164_udp_and_tcp() -> None:
    assert trunk().request_uri("+14155550101") == "sip:+14155550101@127.0.0.1:5090"
    assert (
        trunk(transport="tcp").request_uri("+14155550101")
        == "sip:+14155550101@127.0.0.1:5090;transport=tcp"
    )
    assert trunk(host="::1").request_uri("+14155550101") == "sip:+14155550101@[::1]:5090"


def test_request_uri_national_and_tech_prefix() -> None:
    gb_mobile = example("GB", PhoneNumberType.MOBILE)  # +447400123456
    assert trunk(number_format="national").request_uri("+14155550101").startswith("sip:4155550101@")
    assert trunk(number_format="national").request_uri(gb_mobile).startswith("sip:07400123456@")
    prefixed = trunk(number_format="tech_prefix", tech_prefix="0101#")
    uri = prefixed.request_uri("+14155550101")
    assert uri == "sip:0101%2314155550101@127.0.0.1:5090"  # '#' escaped in the user part
    assert parse_target(uri).user == "0101#14155550101"


def test_request_uri_takes_parsed_numbers() -> None:
    destination = normalise("+14155550102")
    assert trunk().request_uri(destination.parsed) == "sip:+14155550102@127.0.0.1:5090"


def test_password_never_shows_in_repr_or_json() -> None:
    t = trunk(username="acct", password="hunter2-not-real")
    assert "hunter2" not in repr(t)
    assert "hunter2" not in str(t)
    assert "hunter2" not in t.model_dump_json()
    assert "hunter2" not in json.dumps(t.model_dump(mode="json"))
    credentials = t.credentials()
    assert credentials is not None
    assert credentials.password == "hunter2-not-real"


SID = "AC" + "0" * 32


def twilio_trunk(**values: object) -> Trunk:
    base = {"name": "tw", "kind": "twilio", "account_sid": SID, "auth_token": "secret",
            "caller_id": "+14155550100"}  # fmt: skip
    return Trunk.model_validate({**base, **values})


def test_twilio_trunks_need_an_account_and_no_sip_settings() -> None:
    assert twilio_trunk().host is None
    assert "secret" not in repr(twilio_trunk())
    cases: list[tuple[dict[str, object], str]] = [
        ({"account_sid": "AC123"}, "account_sid"),
        ({"auth_token": ""}, "auth_token"),
        ({"caller_id": None}, "caller_id"),
        ({"host": "127.0.0.1"}, "host: sip trunks only"),
        ({"number_format": "national"}, "number_format: sip trunks only"),
        ({"api_base": "ftp://127.0.0.1"}, "api_base"),
    ]
    for values, message in cases:
        with pytest.raises(ValidationError, match=message):
            twilio_trunk(**values)
    with pytest.raises(ValidationError, match="needs host"):
        Trunk.model_validate({"name": "s"})
    with pytest.raises(ValidationError, match="account_sid: twilio trunks only"):
        trunk(account_sid=SID)
    with pytest.raises(ValueError, match="no SIP address"):
        twilio_trunk().probe_uri()
    with pytest.raises(ValidationError):
        trunk(kind="pstn")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"transport": "sctp"}, "transport"),
        ({"port": 70000}, "port"),
        ({"number_format": "tech_prefix"}, "tech_prefix"),
        ({"tech_prefix": "99"}, "only used with"),
        ({"username": "acct"}, "both username and password"),
        ({"allowed_countries": ["US", "ZZ"]}, "ZZ"),
        ({"allowed_countries": "US"}, "list"),
        ({"host": "127.0.0.1:5060"}, "no port"),
        ({"name": "bad name"}, "trunk names"),
        ({"trying_timeout": 0}, "trying_timeout"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_trunk_validation_errors(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        trunk(**values)


def test_trunk_country_list_narrows() -> None:
    assert trunk().allows_country("DE")  # no list: the deployment-wide one decides
    limited = trunk(allowed_countries=["us", "CA"])
    assert limited.allowed_countries == ("US", "CA")
    assert limited.allows_country("US")
    assert not limited.allows_country("GB")
