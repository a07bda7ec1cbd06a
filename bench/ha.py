"""The high-availability topology on one machine: what `make ha` starts and drills run on.

Every part is a process this module owns, on loopback ports, with data directories under
one working directory:

* PostgreSQL: a primary and a synchronous standby managed by pg_auto_failover
  (`bench.ha_postgres`), or, with `--pg single`, one server (tests that need no failover);
* Redis: a master, a replica and three Sentinels (`bench.ha_redis`), or one server;
* two SIPp carriers (trunks `trunk-a` and `trunk-b`, callee +14155550100 presses 1);
* N complete ackline nodes (`ackline serve --role all` with the worker inside: API, worker
  and SIP gateway), each with its own HTTP and SIP port;
* HAProxy in front of the nodes' APIs, taking a node out of rotation when its `/readyz`
  fails (a node that is stopping turns unready first: `ACKLINE_UNREADY_GRACE`).

    python -m bench.ha up [--workdir var/ha] [--nodes 2] [--pg cluster|single]
                          [--redis sentinel|single]
    python -m bench.ha status|down [--workdir var/ha]

`up` leaves everything running and writes `state.json` (every pid, port and URL) into the
working directory; `down` stops what it lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import yaml

from bench import chaos
from bench.chaos import Progress
from bench.ha_postgres import STATE_FILE as PG_STATE_FILE
from bench.ha_postgres import PgAutoFailover, stop_saved
from bench.ha_redis import RedisSentinelSet
from bench.ports import free_port
from bench.services import (
    Owned,
    Postgres,
    Redis,
    ServiceError,
    Services,
    SippCarrier,
    ackline_command,
    group_running,
    service_env,
    wait_for,
)

# the chaos bench's client (bench.chaos.post_alert) drives the drills' load too, and its
# callees are the carriers' (one presses 1, one never does)
COMPANY = chaos.COMPANY
API_KEY = chaos.API_KEY
PRESSER, SILENT, DTMF_1 = chaos.PRESSER, chaos.SILENT, chaos.DTMF_1
PREFIX = "ackline"
TRUNKS = ("trunk-a", "trunk-b")
STATE_FILE = "state.json"
READY_BOUND = 60.0  # seconds for a node to answer /readyz on a loaded machine
# A stopping node: HAProxy checks /readyz every HEALTH_INTERVAL and takes a node out after
# one failure, so an unready grace of a few intervals empties it before it stops.
HEALTH_INTERVAL = 0.25
UNREADY_GRACE = 2.0


class PgMode(enum.StrEnum):
    CLUSTER = "cluster"  # pg_auto_failover: primary + synchronous standby + monitor
    SINGLE = "single"  # one server: no failover


class RedisMode(enum.StrEnum):
    SENTINEL = "sentinel"  # master + replica + three Sentinels
    SINGLE = "single"


@dataclass(frozen=True)
class HaParams:
    nodes: int = 2
    pg: PgMode = PgMode.CLUSTER
    redis: RedisMode = RedisMode.SENTINEL
    lease: float = 15.0  # ACKLINE_LEASE_SECONDS: how soon a dead node's sends are retaken
    drain_timeout: float = 30.0  # a stopping node lets its calls end within this
    max_duration: float = 40.0  # every policy's max_duration
    progress: bool = True


def ackline_config(carrier_ports: Sequence[int], max_duration: float) -> dict[str, Any]:
    """Two diverse trunks in priority order, probed every second: a dead one is skipped."""
    trunks = [
        {"name": name, "host": "127.0.0.1", "port": port, "transport": "udp",
         "priority": i + 1, "trying_timeout": "2s"}
        for i, (name, port) in enumerate(zip(TRUNKS, carrier_ports, strict=True))
    ]  # fmt: skip
    return {
        "company": COMPANY,
        "recipients": [
            {"id": "presser", "name": "Presses 1", "phone": PRESSER},
            {"id": "silent", "name": "Never presses a key", "phone": SILENT},
        ],
        "policies": chaos.policies(max_duration),  # the chaos bench's three behaviours
        "carriers": {
            "allowed_countries": ["US"],
            "probe": {"interval": "1s", "down_after": 2, "up_after": 1},
            "breaker": {"failures": 3, "cooldown": "3s"},
            "call_budget": {"per_hour": None, "per_number_per_hour": None},
            "trunks": trunks,
        },
    }


def haproxy_config(port: int, backends: Sequence[tuple[str, int]]) -> str:
    """HTTP on `port`, round robin over the nodes' APIs; a node leaves the rotation after
    one failed /readyz (every HEALTH_INTERVAL) and comes back after two good ones. A
    request whose connection to a node fails before it is sent goes to another node."""
    ms = int(HEALTH_INTERVAL * 1000)
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{p} check inter {ms} fall 1 rise 2" for name, p in backends
    )
    return f"""global
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
    retry-on conn-failure

frontend api
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}
"""


class Node(Owned):
    """One complete ackline node: API, worker and SIP gateway in one process."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str]) -> None:
        self.http_port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        node_env = {**env, "ACKLINE_AUDIT_DIR": str(self.dir / "audit"),
                    "ACKLINE_EMBEDDED_WORKER": "1"}  # fmt: skip
        super().__init__(name, [], workdir / f"{name}.log", env=node_env, cwd=self.dir)
        self.sip_port = 0
        self.new_sip_port()

    def new_sip_port(self) -> None:
        """A replacement node (after a crash) gets a SIP port of its own, so each call the
        carriers saw tells which life of the node placed it."""
        self.sip_port = free_port()
        self.cmd = [*ackline_command(), "serve", "--role", "all", "--port", str(self.sip_port),
                    "--http-port", str(self.http_port), "--no-webphone"]  # fmt: skip

    def saved(self) -> dict[str, Any]:
        return {**super().saved(), "http_port": self.http_port, "sip_port": self.sip_port}

    def adopt(self, saved: Mapping[str, Any]) -> None:
        super().adopt(saved)
        self.http_port = int(saved["http_port"])
        self.sip_port = int(saved["sip_port"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def audit_file(self) -> Path:
        return self.dir / "audit" / f"{COMPANY}.jsonl"

    async def wait_ready(self, timeout: float = READY_BOUND) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:

            async def ready() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await client.get("/readyz")).status_code == 200
                return False

            await wait_for(ready, timeout, self.name, self)


class Topology:
    """Every process of the HA set-up; `services` stops them all on close."""

    def __init__(self, params: HaParams, services: Services, workdir: Path, say: Progress) -> None:
        self.params = params
        self.services = services
        self.workdir = workdir
        self.say = say
        self.pg: Any = None  # PgAutoFailover or Postgres
        self.redis: Any = None  # RedisSentinelSet or Redis
        self.carriers = [
            SippCarrier(free_port(), workdir / name, PRESSER, DTMF_1) for name in TRUNKS
        ]
        self.nodes: list[Node] = []
        self.lb_port = free_port()
        self.haproxy: Owned | None = None
        self.settings: dict[str, str] = {}  # the nodes' environment on top of service_env
        self.env: dict[str, str] = {}
        self.lives: dict[int, int] = {}  # SIP port -> pid of the node life that used it
        self.started_at = time.time()

    @classmethod
    def attach(cls, workdir: Path, services: Services, say: Progress) -> Topology:
        """The topology `up` left running in `workdir`, rebuilt from its state file so a
        drill can crash, restart and measure it as if it had started it. Refuses (a
        ServiceError) when there is none or a process of it is gone."""
        workdir = workdir.resolve()
        dead = dead_processes(workdir)
        if dead:
            raise ServiceError(f"not every process of the topology in {workdir} runs: "
                               + ", ".join(dead))  # fmt: skip
        saved = json.loads((workdir / STATE_FILE).read_text())
        if "topology" not in saved:
            raise ServiceError(f"{workdir / STATE_FILE} was written by an older bench.ha: "
                               "`down` and `up` it again")  # fmt: skip
        saved = saved["topology"]
        params = {**saved["params"], "pg": PgMode(saved["params"]["pg"]),
                  "redis": RedisMode(saved["params"]["redis"])}  # fmt: skip
        top = cls(HaParams(**params, progress=say.enabled), services, workdir, say)
        top.started_at = saved["started_at"]
        if top.params.pg is PgMode.SINGLE:
            top.pg = Postgres.adopt(saved["postgres"])
        else:
            top.pg = PgAutoFailover.adopt(workdir / "pg")
        if top.params.redis is RedisMode.SINGLE:
            top.redis = Redis(int(saved["redis"]["port"]), workdir)
            top.redis.adopt(saved["redis"])
        else:
            top.redis = RedisSentinelSet.adopt(saved["redis"])
        top.carriers = []
        for name, carrier in zip(TRUNKS, saved["carriers"], strict=True):
            top.carriers.append(SippCarrier(int(carrier["port"]), workdir / name, PRESSER,
                                            DTMF_1))  # fmt: skip
            top.carriers[-1].adopt(carrier)
        top.settings = dict(saved["settings"])
        top.env = service_env(top.settings)
        for node_state in saved["nodes"]:
            node = Node(node_state["name"], workdir, top.env)
            node.adopt(node_state)
            top.nodes.append(node)
            top.lives[node.sip_port] = node.pid
        top.lb_port = int(saved["lb_port"])
        top.haproxy = Owned.adopted(saved["haproxy"])
        for service in [top.pg, top.redis, *top.carriers, *top.nodes, top.haproxy]:
            services.add(service)
        return top

    @property
    def base_url(self) -> str:
        """Where clients send requests: the load balancer."""
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def database_url(self) -> str:
        if isinstance(self.pg, Postgres):
            return self.pg.url("ackline")
        return str(self.pg.dsn("ackline"))

    @property
    def redis_url(self) -> str:
        return str(self.redis.url)

    async def start(self) -> None:
        await self._start_postgres()
        await self._start_redis()
        for carrier in self.carriers:
            self.services.add(carrier)
            carrier.start()
        for carrier in self.carriers:
            await carrier.wait_ready()
        self.say(f"carriers :{', :'.join(str(c.port) for c in self.carriers)} up")
        config = self.workdir / "ackline.yaml"
        config.write_text(yaml.safe_dump(ackline_config([c.port for c in self.carriers],
                                                        self.params.max_duration)))  # fmt: skip
        self.settings = {
            "ACKLINE_DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "ACKLINE_REDIS_PREFIX": PREFIX,
            "ACKLINE_CONFIG": str(config),
            "ACKLINE_API_KEYS": f"{API_KEY}:{COMPANY}",
            "ACKLINE_POLL_INTERVAL": "0.5",
            "ACKLINE_LEASE_SECONDS": f"{self.params.lease:g}",
            "ACKLINE_DRAIN_TIMEOUT": f"{self.params.drain_timeout:g}",
            "ACKLINE_UNREADY_GRACE": f"{UNREADY_GRACE:g}",
            "ACKLINE_VOICE_RING_TIMEOUT": "10",
            "ACKLINE_PROMPT_CACHE": str(self.workdir / "prompts"),
        }  # fmt: skip
        self.env = service_env(self.settings)
        # the first node migrates the schema alone; the others start against it
        for i in range(self.params.nodes):
            node = Node(f"node-{chr(ord('a') + i)}", self.workdir, self.env)
            self.nodes.append(node)
            self.services.add(node)
            self._start(node)
            if i == 0:
                await node.wait_ready()
        for node in self.nodes:
            await node.wait_ready()
        self.say("nodes " + ", ".join(f"{n.name} :{n.http_port} (sip :{n.sip_port})"
                                      for n in self.nodes) + " ready")  # fmt: skip
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.lb_port, [(n.name, n.http_port) for n in self.nodes]))
        self.haproxy = Owned("haproxy", ["haproxy", "-db", "-f", str(cfg)],
                             self.workdir / "haproxy.log")  # fmt: skip
        self.services.add(self.haproxy)
        self.haproxy.start()
        await self.wait_balanced()
        self.say(f"load balancer {self.base_url} up")

    async def _start_postgres(self) -> None:
        if self.params.pg is PgMode.SINGLE:
            pg = Postgres(free_port(), self.workdir / "postgres.log")
            self.services.add(pg)
            await asyncio.to_thread(pg.init)
            await asyncio.to_thread(pg.start)
            admin = await asyncpg.connect(pg.url("postgres"))
            try:
                await admin.execute("CREATE DATABASE ackline")
            finally:
                await admin.close()
            self.pg = pg
        else:
            cluster = PgAutoFailover(self.workdir / "pg")
            self.services.add(cluster)
            await asyncio.to_thread(cluster.start)
            self.pg = cluster
        self.say(f"postgresql ({self.params.pg}) up: {self.database_url}")

    async def _start_redis(self) -> None:
        if self.params.redis is RedisMode.SINGLE:
            redis = Redis(free_port(), self.workdir)
            self.services.add(redis)
            redis.start()
            await redis.wait_ready()
            self.redis = redis
        else:
            sentinels = RedisSentinelSet(self.workdir / "redis")
            self.services.add(sentinels)
            await asyncio.to_thread(sentinels.start)
            self.redis = sentinels
        self.say(f"redis ({self.params.redis}) up: {self.redis_url}")

    async def wait_balanced(self, timeout: float = 30.0) -> None:
        """Until the load balancer sends requests to every running node."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:

            async def balanced() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    answers = [await client.get("/readyz") for _ in range(2 * len(self.nodes))]
                    return all(a.status_code == 200 for a in answers)
                return False

            await wait_for(balanced, timeout, "the load balancer", self.haproxy)
        await asyncio.sleep(3 * HEALTH_INTERVAL)  # rise 2: a restarted node is back in

    async def restart_node(self, node: Node) -> float | None:
        """Graceful: SIGTERM (the node turns unready, drains, exits), start, wait ready.
        Returns how long the node took to stop (None: it had to be killed)."""
        took = await asyncio.to_thread(node.stop, self.params.drain_timeout + UNREADY_GRACE + 10)
        self._start(node)
        await node.wait_ready()
        await self.wait_balanced()
        return took

    def crash_node(self, node: Node) -> int:
        pid = node.pid
        node.kill()
        return pid

    async def replace_node(self, node: Node) -> None:
        """Start a crashed node again, as a new life with its own SIP port."""
        node.new_sip_port()
        self._start(node)
        await node.wait_ready()
        await self.wait_balanced()

    def _start(self, node: Node) -> None:
        node.start()
        self.lives[node.sip_port] = node.pid

    def state(self) -> dict[str, Any]:
        """What `up` writes for `status`, `down`, `attach` and anyone who wants to point
        at it."""
        owned: list[dict[str, Any]] = []
        for service in self.services.owned():
            for name, group in _pids(service):
                owned.append({"name": name, "pid": group})
        assert self.haproxy is not None
        p = self.params
        topology = {
            "started_at": self.started_at,
            "params": {"nodes": p.nodes, "pg": p.pg.value, "redis": p.redis.value,
                       "lease": p.lease, "drain_timeout": p.drain_timeout,
                       "max_duration": p.max_duration},
            "settings": self.settings,
            "postgres": self.pg.saved() if isinstance(self.pg, Postgres) else None,
            "redis": (self.redis.state() if isinstance(self.redis, RedisSentinelSet)
                      else {**self.redis.saved(), "port": self.redis.port}),
            "carriers": [{**c.saved(), "port": c.port} for c in self.carriers],
            "nodes": [n.saved() for n in self.nodes],
            "lb_port": self.lb_port,
            "haproxy": self.haproxy.saved(),
        }  # fmt: skip
        return {
            "started_at": self.started_at,
            "api": self.base_url,
            "api_key": API_KEY,
            "nodes": [
                {"name": n.name, "api": n.url, "sip": f"127.0.0.1:{n.sip_port}"} for n in self.nodes
            ],
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "carriers": {
                name: f"127.0.0.1:{c.port}" for name, c in zip(TRUNKS, self.carriers, strict=True)
            },
            "processes": owned,
            "topology": topology,  # what `attach` rebuilds it from
        }

    def save(self) -> dict[str, Any]:
        """Write the state file (and the PostgreSQL cluster's own): every current pid."""
        state = self.state()
        if isinstance(self.pg, PgAutoFailover):
            self.pg.save_state()
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        return state


def _pids(service: Any) -> list[tuple[str, int]]:
    """(name, process group) of a service's processes, whatever kind it is. The
    PostgreSQL cluster is left out: `down` stops it last, with its own state file."""
    found: list[tuple[str, int | None]]
    if isinstance(service, RedisSentinelSet):
        found = [(name, p.pid) for name, p in service.nodes.items() if p.alive()]
    elif isinstance(service, Owned):
        found = [(service.name, service.pid)] if service.alive() else []
    elif isinstance(service, Postgres):
        found = [("postgres", service.pid)]
    else:
        found = []
    groups = []
    for name, pid in found:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                groups.append((name, os.getpgid(pid)))
    return groups


def down(workdir: Path, say: Callable[[str], None] = print) -> int:
    """Stop what `up` started: SIGTERM each process group, SIGKILL after 40 s."""
    path = workdir / STATE_FILE
    if not path.exists():
        say(f"nothing to stop: no {path}")
        return 0
    state = json.loads(path.read_text())
    processes = state["processes"]
    for proc in reversed(processes):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 40
    while any(group_running(p["pid"]) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in processes:
        if group_running(proc["pid"]):
            say(f"{proc['name']} (pid {proc['pid']}) ignored SIGTERM: killed")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc["pid"], signal.SIGKILL)
    path.unlink()
    say(f"stopped {len(processes)} processes")
    single = state.get("topology", {}).get("postgres")
    if single is not None:  # a single server's data, in a directory the postgres user reaches
        shutil.rmtree(single["root"], ignore_errors=True)
    if (workdir / "pg" / PG_STATE_FILE).exists():
        stop_saved(workdir / "pg")
        say("stopped the PostgreSQL cluster")
    return 0


def _groups(workdir: Path) -> list[dict[str, Any]]:
    """Every process group `up` left in `workdir`, the PostgreSQL cluster's included."""
    groups = list(json.loads((workdir / STATE_FILE).read_text())["processes"])
    pg_state = workdir / "pg" / PG_STATE_FILE
    if pg_state.exists():
        saved = json.loads(pg_state.read_text())["groups"]
        groups += [{"name": f"pg {name}", "pid": pid} for name, pid in saved.items()]
    return groups


def dead_processes(workdir: Path) -> list[str]:
    """What is missing of the topology in `workdir`: its state file, or processes."""
    if not (workdir / STATE_FILE).exists():
        return [f"no {workdir / STATE_FILE}"]
    return [f"{p['name']} (pid {p['pid']})" for p in _groups(workdir)
            if not group_running(p["pid"])]  # fmt: skip


def status(workdir: Path) -> int:
    path = workdir / STATE_FILE
    if not path.exists():
        print(f"not running: no {path}")
        return 1
    state = json.loads(path.read_text())
    dead = dead_processes(workdir)
    total = len(_groups(workdir))
    print(json.dumps({k: v for k, v in state.items() if k not in ("processes", "topology")},
                     indent=2))  # fmt: skip
    print(f"{total - len(dead)} of {total} processes up"
          + "".join(f"\n  down: {d}" for d in dead))  # fmt: skip
    return 1 if dead else 0


async def _up(params: HaParams, workdir: Path, services: Services) -> Topology:
    topology = Topology(params, services, workdir, Progress(params.progress))
    await topology.start()
    return topology


def up(params: HaParams, workdir: Path) -> int:
    if (workdir / STATE_FILE).exists():
        print(f"already up (see {workdir / STATE_FILE}); `make ha-down` first", file=sys.stderr)
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    services = Services()
    try:
        topology = asyncio.run(_up(params, workdir.resolve(), services))
    except (ServiceError, OSError, SystemExit) as exc:
        print(f"error: the topology did not come up: {exc}", file=sys.stderr)
        services.close()
        return 1
    except BaseException:
        services.close()
        raise
    state = topology.save()
    print(f"up: API {state['api']} (X-API-Key {API_KEY}); nodes "
          + ", ".join(f"{n['name']} {n['api']} sip {n['sip']}" for n in state["nodes"])
          + f"\ndatabase {state['database_url']}\nredis {state['redis_url']}\n"
          f"logs and data in {workdir}; stop with `make ha-down`")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ha", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--workdir", type=Path, default=Path("var/ha"))
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--pg", type=PgMode, choices=list(PgMode), default=PgMode.CLUSTER)
    parser.add_argument("--redis", type=RedisMode, choices=list(RedisMode),
                        default=RedisMode.SENTINEL)  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "down":
        return down(args.workdir)
    if args.command == "status":
        return status(args.workdir)
    return up(HaParams(nodes=args.nodes, pg=args.pg, redis=args.redis), args.workdir)


if __name__ == "__main__":
    sys.exit(main())
