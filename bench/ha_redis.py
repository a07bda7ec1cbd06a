"""Redis with a replica and three Sentinels, as processes a bench or test owns.

A master and one replica (redis-server, config files in the work directory, loopback
ports of their own) and three sentinels (quorum 2, a node is down after 1 s of silence),
so a master killed -9 is replaced by its replica within about 2-3 s. ackline reaches it
through `url`, a redis+sentinel:// URL, as it would in production.

    python -m bench.ha_redis up --workdir DIR     # leaves it running; DIR/state.json
    python -m bench.ha_redis down --workdir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis

from bench.ports import free_port
from bench.services import Owned, ServiceError, group_running, tail

log = logging.getLogger(__name__)

MASTER_NAME = "ackline"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
HOST = "127.0.0.1"
STATE = "state.json"

Address = tuple[str, int]


def _ask(port: int, *command: str) -> object:
    """One command to a node or sentinel on loopback, None when it does not answer."""
    client = redis.Redis(HOST, port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return client.execute_command(*command)  # type: ignore[no-untyped-call]
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisSentinelSet:
    """redis-a (first master), redis-b (its replica), sentinel-1..3; all stopped on close."""

    def __init__(self, workdir: Path, master_name: str = MASTER_NAME) -> None:
        self.workdir = workdir
        self.master_name = master_name
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports: dict[str, int] = {}
        self.nodes: dict[str, Owned] = {}
        self._down: set[str] = set()  # nodes killed on purpose: not an error while waiting
        for name in ("redis-a", "redis-b", "sentinel-1", "sentinel-2", "sentinel-3"):
            port = free_port()
            while port in self.ports.values():
                port = free_port()
            self.ports[name] = port
            conf = workdir / f"{name}.conf"
            cmd = ["redis-server", str(conf)]
            if name.startswith("sentinel"):
                cmd.append("--sentinel")
            self.nodes[name] = Owned(name, cmd, workdir / f"{name}.log", cwd=workdir)

    @property
    def sentinels(self) -> list[Address]:
        return [(HOST, p) for n, p in self.ports.items() if n.startswith("sentinel")]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}"

    def _write_configs(self) -> None:
        """Sentinels and replicas rewrite their own file (CONFIG REWRITE): it must be
        theirs to write, so it is generated here rather than passed as arguments."""
        master = self.ports["redis-a"]
        for name, port in self.ports.items():
            lines = [f"port {port}", f"bind {HOST}", f"dir {self.workdir}", 'logfile ""',
                     f"pidfile {self.workdir / name}.pid"]  # fmt: skip
            if name.startswith("sentinel"):
                m = self.master_name
                lines += [f"sentinel monitor {m} {HOST} {master} 2",
                          f"sentinel down-after-milliseconds {m} {DOWN_AFTER_MS}",
                          f"sentinel failover-timeout {m} {FAILOVER_TIMEOUT_MS}",
                          f"sentinel parallel-syncs {m} 1",
                          # known at once rather than at the master's next INFO (10 s)
                          f"sentinel known-replica {m} {HOST} {self.ports['redis-b']}"]  # fmt: skip
            else:
                # No persistence: a bus and counters; a restarted node resyncs from the
                # master as a replica (sentinel turns it into one).
                lines += ['save ""', "appendonly no", "repl-diskless-sync yes",
                          "repl-diskless-sync-delay 0"]  # fmt: skip
                if name != "redis-a":
                    lines.append(f"replicaof {HOST} {master}")
            (self.workdir / f"{name}.conf").write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start everything; returns once every sentinel names the same master, knows
        the two others, and that master has its replica online (a failover can happen)."""
        self._write_configs()
        for node in self.nodes.values():
            node.start()
        self._until(self._ready, timeout, "the sentinel set to be ready")

    def _ready(self) -> bool:
        masters = {self._sentinel_master(p) for _, p in self.sentinels}
        if len(masters) != 1 or None in masters:
            return False
        for _, port in self.sentinels:
            others = _ask(port, "SENTINEL", "SENTINELS", self.master_name)
            if not isinstance(others, list) or len(others) < 2:
                return False
            replicas = _ask(port, "SENTINEL", "REPLICAS", self.master_name)
            if not isinstance(replicas, list) or not any(
                "s_down" not in _text(_fields(r).get("flags", "")) for r in replicas
            ):
                return False
        [(_, port)] = masters  # type: ignore[misc]
        info = _ask(port, "INFO", "replication")
        return isinstance(info, dict) and int(info.get("connected_slaves", 0)) >= 1

    def _until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.exited() and node.name not in self._down:
                    raise ServiceError(f"{node.name} exited:\n{tail(node.log)}")
            if check():
                return
            time.sleep(0.05)
        raise ServiceError(f"timed out waiting for {what}")

    def _sentinel_master(self, port: int) -> Address | None:
        got = _ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        if not isinstance(got, list | tuple) or len(got) != 2:
            return None
        return _text(got[0]), int(_text(got[1]))

    def master(self) -> Address:
        """The master as most sentinels name it."""
        votes: dict[Address, int] = {}
        for _, port in self.sentinels:
            addr = self._sentinel_master(port)
            if addr is not None:
                votes[addr] = votes.get(addr, 0) + 1
        if not votes:
            raise ServiceError("no sentinel answers")
        return max(votes, key=lambda a: votes[a])

    def node_at(self, address: Address) -> str:
        return next(n for n, p in self.ports.items() if p == address[1])

    def crash_master(self) -> Address:
        """SIGKILL the current master; returns its address."""
        address = self.master()
        name = self.node_at(address)
        self._down = {*self._down, name}
        self.nodes[name].kill()
        return address

    def wait_failover(self, old: Address, timeout: float = 15.0) -> Address:
        """Until a quorum of sentinels names a master other than `old` and it answers as
        a master (writable); returns it."""
        found: list[Address] = []

        def promoted() -> bool:
            names = [self._sentinel_master(p) for _, p in self.sentinels]
            new = [a for a in names if a is not None and a != old]
            if len(new) < 2 or len(set(new)) != 1:
                return False
            role = _ask(new[0][1], "ROLE")
            if isinstance(role, list) and role and _text(role[0]) == "master":
                found.append(new[0])
                return True
            return False

        self._until(promoted, timeout, f"a failover away from {old[0]}:{old[1]}")
        return found[-1]

    def restart(self, name: str) -> None:
        """Start a node killed before on its port (an old master comes back and is
        turned into a replica by the sentinels)."""
        self._down = self._down - {name}
        self.nodes[name].start()

    def close(self) -> None:
        for node in reversed(list(self.nodes.values())):
            try:
                node.stop(timeout=5)
            except Exception as exc:  # keep stopping the others
                log.warning("stopping %s failed: %r", node.name, exc, exc_info=True)

    def __enter__(self) -> RedisSentinelSet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def state(self) -> dict[str, Any]:
        """What `down` needs to stop the set, and `adopt` to take it over."""
        running = {n: node for n, node in self.nodes.items() if node.alive()}
        return {
            "url": self.url,
            "master_name": self.master_name,
            "workdir": str(self.workdir),
            "ports": self.ports,
            "pids": {n: node.pid for n, node in running.items()},
            "nodes": {n: node.saved() for n, node in running.items()},
        }

    @classmethod
    def adopt(cls, state: Mapping[str, Any]) -> RedisSentinelSet:
        """The set `state()` described, left running by another run."""
        adopted = cls(Path(state["workdir"]), state["master_name"])
        adopted.ports = {name: int(port) for name, port in state["ports"].items()}
        for name, node in adopted.nodes.items():
            node.adopt(state["nodes"][name])
        return adopted


def _fields(reply: object) -> dict[str, str]:
    """A sentinel's flat [key, value, ...] list (or a dict, RESP3) as a dict."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    items = [_text(x) for x in reply] if isinstance(reply, list) else []
    return dict(zip(items[::2], items[1::2], strict=False))


def _down(workdir: Path) -> int:
    path = workdir / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"no running set in {workdir}: {exc}", file=sys.stderr)
        return 1
    pids = [int(p) for p in state["pids"].values()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(group_running(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if group_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    path.unlink()
    print(f"stopped {len(pids)} processes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ha_redis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    if args.action == "down":
        return _down(workdir)
    if (workdir / STATE).exists():
        print(f"{workdir / STATE} exists: `down` it first", file=sys.stderr)
        return 1
    nodes = RedisSentinelSet(workdir)
    try:
        nodes.start()
    except BaseException:
        nodes.close()
        raise
    (workdir / STATE).write_text(json.dumps(nodes.state(), indent=2) + "\n")
    print(f"REDIS_URL={nodes.url}")
    print(f"master {nodes.master()[0]}:{nodes.master()[1]}; state in {workdir / STATE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
