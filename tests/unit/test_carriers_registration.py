"""Registering trunks: the register: YAML, health while not registered, inbound admission
of calls to a registered contact."""

from __future__ import annotations

import json
import secrets

import pytest
from prometheus_client import REGISTRY

from api.routes.carriers import describe
from carriers.config import CarrierConfigError, load_carriers
from carriers.health import HealthBoard, HealthChange, TrunkHealth
from carriers.registration import register_target
from carriers.router import CarrierRouter
from carriers.trunk import Trunk
from gateway.admission import InboundGuard, TrustedTrunk
from gateway.call import Gateway
from gateway.sip.auth import Credentials
from gateway.sip.registration import ContactBindings, RegistrationState
from tests.unit.test_admission import invite


def config(register: str, **env: str) -> Trunk:
    text = f"""
carriers:
  allowed_countries: [US]
  trunks:
    - name: carrier-a
      host: 192.0.2.10
      port: 5080
      username: acme
      password_env: ACKLINE_TEST_TRUNK_PASSWORD
      register: {register}
"""
    return load_carriers(text).trunks[0]


@pytest.fixture(autouse=True)
def trunk_password(monkeypatch: pytest.MonkeyPatch) -> str:
    password = secrets.token_hex(8)
    monkeypatch.setenv("ACKLINE_TEST_TRUNK_PASSWORD", password)
    return password


# -- configuration --------------------------------------------------------------------------


def test_register_true_takes_everything_from_the_trunk(trunk_password: str) -> None:
    trunk = config("true")
    target = register_target(trunk)
    assert str(target.registrar) == "sip:192.0.2.10:5080"
    assert (target.user, target.contact_user, target.expires) == ("acme", "acme", 3600)
    assert target.credentials == Credentials("acme", trunk_password)
    assert target.transport == "udp"
    assert config("false").registration is None


def test_register_settings_override_the_trunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACKLINE_TEST_REG_PASSWORD", "reg-" + "pw")
    trunk = config(
        "{username: acme-reg, password_env: ACKLINE_TEST_REG_PASSWORD, "
        "registrar: 'reg.carrier-a.example:5070', expires: 120, contact_user: acme-in}"
    )
    target = register_target(trunk)
    assert str(target.registrar) == "sip:reg.carrier-a.example:5070"
    assert str(target.registrar.host) == "reg.carrier-a.example"
    assert (target.user, target.contact_user, target.expires) == ("acme-reg", "acme-in", 120)
    assert target.credentials == Credentials("acme-reg", "reg-pw")
    # the password is never shown, not even to an admin
    assert "reg-pw" not in trunk.model_dump_json()
    assert "reg-pw" not in repr(trunk)
    described = describe(trunk, {}, None, {})
    assert "reg-pw" not in json.dumps(described)
    assert described["register"] == {
        "username": "acme-reg", "registrar": "reg.carrier-a.example:5070", "expires": 120,
        "contact_user": "acme-in", "keepalive": 30.0, "keepalive_timeout": 10.0,
    }  # fmt: skip


def test_registrar_forms() -> None:
    assert config("{registrar: 192.0.2.99}").registrar_uri() == "sip:192.0.2.99:5060"
    assert config("{registrar: '[2001:db8::1]:5070'}").registrar_uri() == "sip:[2001:db8::1]:5070"
    tcp = Trunk.model_validate(
        {"name": "t", "host": "192.0.2.1", "transport": "tcp", "register": {"username": "u"}}
    )
    assert tcp.registrar_uri() == "sip:192.0.2.1:5060;transport=tcp"


@pytest.mark.parametrize(
    ("register", "message"),
    [
        ("{expires: 0}", "register.expires"),
        ("{registrar: 'bad host:1'}", "invalid host"),
        ("{registrar: 'host:99999'}", "invalid port"),
        ("{contact_user: 'a b'}", "invalid SIP user"),
        ("{password_env: ACKLINE_TEST_UNSET_PASSWORD}", "ACKLINE_TEST_UNSET_PASSWORD is not set"),
        ("{unknown: 1}", "register.unknown"),
    ],
)
def test_register_mistakes_are_named(register: str, message: str) -> None:
    with pytest.raises(CarrierConfigError) as error:
        config(register)
    assert message in str(error.value)


def test_register_needs_a_username_and_a_sip_trunk() -> None:
    with pytest.raises(ValueError, match="register needs a username"):
        Trunk.model_validate({"name": "t", "host": "192.0.2.1", "register": True})
    with pytest.raises(ValueError, match="register: sip trunks only"):
        Trunk.model_validate(
            {"name": "cloud", "kind": "twilio", "account_sid": "AC" + "0" * 32,
             "auth_token": "x", "caller_id": "+14155550109", "register": True}
        )  # fmt: skip


# -- health -----------------------------------------------------------------------------------


def test_a_registering_trunk_is_down_until_registered() -> None:
    changes: list[HealthChange] = []
    board = HealthBoard(["a", "b"], on_change=changes.append, clock=lambda: 0.0)
    board.expect_registration("a")
    assert not board.usable("a")
    assert board.usable("b")
    assert gauge("a") == 0
    board.registration_result("a", RegistrationState.REGISTERED, "registered for 60 s")
    assert board.usable("a")
    assert gauge("a") == 1
    board.registration_result("a", RegistrationState.REGISTERED, "again")  # no change
    board.registration_result("a", RegistrationState.FAILED, "503 Service Unavailable")
    assert not board.usable("a")
    assert gauge("a") == 0
    assert changes == [
        HealthChange("a", "registration", "unregistered", "registered", "registered for 60 s"),
        HealthChange("a", "registration", "registered", "failed", "503 Service Unavailable"),
    ]
    health = TrunkHealth("c")
    assert health.registration is None
    assert health.usable(0.0)


def gauge(trunk: str) -> float | None:
    return REGISTRY.get_sample_value("ackline_trunk_registered", {"trunk": trunk})


async def test_router_skips_and_reports_an_unregistered_trunk() -> None:
    trunks = [
        Trunk.model_validate({"name": "reg", "host": "192.0.2.1", "register": {"username": "u"},
                              "priority": 1}),
        Trunk.model_validate({"name": "plain", "host": "192.0.2.2", "priority": 2}),
    ]  # fmt: skip
    router = CarrierRouter(Gateway(), trunks, allowed_countries=["US"])
    router.health.expect_registration("reg")
    report = router.health_report("reg")
    assert (report["registration"], report["usable"]) == ("unregistered", False)
    assert router.health_report("plain")["registration"] is None
    assert router._unusable_reason(trunks[0]) == "down (not registered: unregistered)"
    await router.close()


# -- inbound ----------------------------------------------------------------------------------


def test_a_call_to_the_registered_contact_from_the_registrar_is_that_trunks() -> None:
    bindings = ContactBindings()
    guard = InboundGuard([TrustedTrunk.parse("pbx", ["10.0.0.5"])], bindings=bindings)
    request = invite()  # Request-URI user "hotline"
    assert guard.check(request, "127.0.0.2", 0.0).code == 403  # not bound yet
    bindings.bind("hotline", "carrier-a", {"127.0.0.2"}, until=60.0)
    decision = guard.check(request, "127.0.0.2", 1.0)
    assert (decision.admitted, decision.trunk) == (True, "carrier-a")
    assert guard.check(request, "127.0.0.3", 1.0).code == 403  # anyone else: the ACL
    assert guard.check(request, "127.0.0.2", 60.0).code == 403  # the binding ran out
    assert guard.check(request, "10.0.0.5", 1.0).trunk == "pbx"  # the ACL still works


def test_registered_contact_calls_keep_the_flood_budget() -> None:
    bindings = ContactBindings()
    bindings.bind("hotline", "carrier-a", {"127.0.0.2"}, until=60.0)
    guard = InboundGuard(rate=1.0, burst=1, bindings=bindings)
    assert guard.check(invite(), "127.0.0.2", 0.0).admitted
    flood = guard.check(invite(), "127.0.0.2", 0.0)
    assert (flood.admitted, flood.code, flood.trunk) == (False, 503, "carrier-a")
