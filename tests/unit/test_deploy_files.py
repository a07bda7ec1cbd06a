"""The container deployment files agree with each other and with the code: what the
compose file sets is what ackline reads, what the Dockerfile exposes is what it binds,
and what the build context sends leaves out the virtualenv, local state and secrets.

Docker is not needed; where `docker compose` exists it must accept the file too."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.settings import FILE_SECRETS, parse_rtp_ports

REPO = Path(__file__).resolve().parents[2]
ACKLINE_NODES = ("ackline-a", "ackline-b")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines)
        if word and not word.startswith("#")
    ]


def default(value: str) -> str:
    """`${NAME:-default}` -> default: what compose uses when NAME is not set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_every_service_has_what_it_needs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        build = service.get("build")
        if isinstance(build, dict):
            assert (REPO / build["context"] / build["dockerfile"]).is_file(), name
        elif build is not None:
            assert (REPO / build / "Dockerfile").is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: volume {source}"
        networks = service.get("networks", {})
        assert networks, f"{name} names its networks"
        for network in networks:
            assert network in compose["networks"], f"{name}: network {network}"
        depends = service.get("depends_on", {})
        for other in depends:
            assert other in services, f"{name} depends on unknown {other}"
            if isinstance(depends, dict) and depends[other].get("condition") == ("service_healthy"):
                has_check = "healthcheck" in services[other] or services[other].get("build") == "."
                assert has_check, f"{name} waits for {other}, which has no health check"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: secret {secret}"
        for config in service.get("configs", []):
            assert config["source"] in compose["configs"], f"{name}: config {config}"


def test_postgresql_is_a_primary_and_a_synchronous_standby_under_pg_auto_failover(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert services["pg-monitor"]["command"][:3] == ["pg_autoctl", "create", "monitor"]
    for name in ("pg-a", "pg-b"):
        command = services[name]["command"]
        assert command[:3] == ["pg_autoctl", "create", "postgres"], name
        assert f"--hostname={name}" in command
        assert "--run" in command
        assert "--replication-quorum=true" in command  # commits wait for the standby
        assert "pg-monitor" in services[name]["environment"]["PG_AUTOCTL_MONITOR"]


def test_redis_is_a_master_a_replica_and_three_sentinels(compose: dict[str, Any]) -> None:
    services = compose["services"]
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1] == "redis-master"
    sentinels = [name for name in services if name.startswith("redis-sentinel-")]
    assert len(sentinels) == 3
    conf = (REPO / "deploy" / "redis-sentinel.conf").read_text()
    [(master_name, host, quorum)] = re.findall(
        r"^sentinel monitor (\S+) (\S+) 6379 (\d+)$", conf, re.M
    )
    assert host == "redis-master"
    assert int(quorum) == 2
    for name in sentinels:
        assert "--sentinel" in " ".join(services[name]["command"])
        assert any("redis-sentinel.conf" in v for v in services[name]["volumes"])
    for node in ACKLINE_NODES:
        env = services[node]["environment"]
        assert env["REDIS_MASTER_NAME"] == master_name
        listed = {entry.split(":")[0] for entry in env["REDIS_SENTINELS"].split(",")}
        assert listed == set(sentinels)


def test_ackline_nodes_are_complete_and_each_has_its_own_sip_address(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    advertised = set()
    migrating = []
    for node in ACKLINE_NODES:
        service = services[node]
        env = service["environment"]
        assert service["build"] == "."
        assert "command" not in service  # the image's: serve --role all on 0.0.0.0
        url = env["ACKLINE_DATABASE_URL"]
        assert re.match(r"postgresql://[^@/]+@pg-a:5432,pg-b:5432/ackline\?", url), url
        assert "target_session_attrs=read-write" in url
        config = env["ACKLINE_CONFIG"]
        assert [c["target"] for c in service["configs"]] == [config]
        for name in ("ACKLINE_API_KEYS", "ACKLINE_ACK_SECRET"):
            assert name not in env
            assert name in FILE_SECRETS
            secret = env[f"{name}_FILE"].removeprefix("/run/secrets/")
            assert secret in service["secrets"], name
        assert env["ACKLINE_SIP_HOST"] == "0.0.0.0"
        assert env["ACKLINE_HTTP_HOST"] == "0.0.0.0"
        address = default(env["ACKLINE_SIP_ADVERTISE"])
        assert address == service["networks"]["voice"]["ipv4_address"], node
        advertised.add(address)
        parse_rtp_ports(env["ACKLINE_RTP_PORTS"])
        grace, drain = float(env["ACKLINE_UNREADY_GRACE"]), float(env["ACKLINE_DRAIN_TIMEOUT"])
        assert grace > 0
        stop = int(service["stop_grace_period"].removesuffix("s"))
        assert stop >= grace + drain + 2, "docker must not kill a node that is draining"
        if env.get("ACKLINE_MIGRATE", "true") != "false":
            migrating.append(node)
    assert len(advertised) == len(ACKLINE_NODES)
    assert len(migrating) == 1, "one node migrates the schema, the others wait for it"


def test_haproxy_balances_over_every_node_by_readyz(compose: dict[str, Any]) -> None:
    haproxy = compose["services"]["haproxy"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    cfg = (REPO / "deploy" / "haproxy.cfg").read_text()
    assert re.search(r"^\s*option httpchk GET /readyz$", cfg, re.M)
    servers = re.findall(r"^\s*server (\S+) (\S+):8080$", cfg, re.M)
    assert [host for _, host in servers] == list(ACKLINE_NODES)
    assert any(port.endswith(":8080") for port in haproxy["ports"])


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "var", "deploy/secrets"} <= ignored
    gitignore = (REPO / "deploy" / "secrets" / ".gitignore").read_text().splitlines()
    assert "*" in gitignore


def test_dockerfile_runs_as_non_root_binds_everything_and_exposes_it(
    dockerfile: list[tuple[str, str]],
) -> None:
    users = [args for word, args in dockerfile if word == "USER"]
    assert users
    assert users[-1] not in ("root", "0")
    exposed = set(" ".join(args for word, args in dockerfile if word == "EXPOSE").split())
    env = dict(
        pair.split("=", 1)
        for word, args in dockerfile
        if word == "ENV"
        for pair in shlex.split(args)
    )
    low, high = parse_rtp_ports(env["ACKLINE_RTP_PORTS"])
    assert {"8080/tcp", "5060/udp", "5060/tcp", f"{low}-{high}/udp"} <= exposed
    [cmd] = [args for word, args in dockerfile if word == "CMD"]
    argv = yaml.safe_load(cmd)  # exec form: ackline is PID 1 and gets SIGTERM
    assert argv[:4] == ["ackline", "serve", "--role", "all"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--http-host") + 1] == "0.0.0.0"
    # the advertised address comes from ACKLINE_SIP_ADVERTISE; with none, serve exits 2
    assert "ACKLINE_SIP_ADVERTISE" in (REPO / "Dockerfile").read_text()
    assert "ACKLINE_SIP_ADVERTISE" not in env


def _compose_command() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return command
    return None


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.fail("neither `docker compose` nor docker-compose: run `make system-deps`")
    project = tmp_path / "ackline"
    shutil.copytree(REPO / "deploy", project / "deploy")
    for name in ("docker-compose.yml", "Dockerfile", "ackline.example.yaml"):
        shutil.copy(REPO / name, project / name)
    for secret in ("api_keys", "ack_secret"):
        (project / "deploy" / "secrets" / secret).write_text("placeholder\n")
    proc = subprocess.run(
        [*command, "-f", "docker-compose.yml", "config", "--quiet"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
