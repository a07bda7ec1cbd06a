"""PostgreSQL with a synchronous standby and automatic failover (pg_auto_failover), owned
by a test or a bench: a monitor and two data nodes on free loopback ports.

The standby is synchronous whenever it is up (the formation's number_sync_standbys is 0
and the standby is in the replication quorum): a commit returns only once the standby has
the WAL, so the standby the monitor promotes has every commit a client was told about
(RPO 0). When the standby is down, the monitor moves the primary to `wait_primary`, which
drops synchronous replication so writes go on: availability first, and until the standby
is back a loss of the primary's disk would lose what was written meanwhile (no failover
happens then, there is nothing to fail over to).

`fast=True` shortens the monitor's health checks and timeouts so a crash fails over in a
few seconds instead of 30+: fine on loopback, too eager for a real network.

    python -m bench.ha_postgres up --workdir DIR       # leaves it running; prints the DSN
    python -m bench.ha_postgres status --workdir DIR
    python -m bench.ha_postgres down --workdir DIR
    python -m bench.ha_postgres failover               # crash and switchover, timed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg  # type: ignore[import-untyped]

from bench.ports import free_port, listening
from bench.services import (
    Owned,
    ServiceError,
    _as_postgres,
    group_running,
    postgres_bin,
    postgres_dir,
    tail,
)

log = logging.getLogger(__name__)

STATE_FILE = "ha_postgres.json"
MONITOR = "monitor"
NODES = ("node_a", "node_b")
# Monitor settings (milliseconds) for fast=True: a node is declared down after ~2 s of
# failed health checks, and the promotion waits at most 3 s for the old primary to say it
# demoted (it never will after a crash).
FAST_MONITOR = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "500",
    "pgautofailover.node_considered_unhealthy_timeout": "2000",
    "pgautofailover.primary_demote_timeout": "3000",
    "pgautofailover.startup_grace_period": "3000",
}
# Keeper settings (seconds): a primary cut off from monitor and standby demotes itself
# after this, and it must be shorter than primary_demote_timeout above, or a partitioned
# old primary could still take (blocked, never acknowledged) writes after the promotion.
FAST_KEEPER = {"timeout.network_partition_timeout": "2"}
WRITABLE = ("primary", "wait_primary", "single")


def pg_autoctl() -> str:
    found = shutil.which("pg_autoctl") or str(postgres_bin() / "pg_autoctl")
    if not Path(found).exists():
        raise ServiceError(
            "pg_autoctl is not installed (Debian: pg-auto-failover-cli and "
            "postgresql-15-auto-failover; scripts/install-system-deps.sh installs them)"
        )
    return found


class NodeState(NamedTuple):
    name: str
    port: int
    reported: str
    goal: str
    health: int


class PgAutoFailover:
    """A monitor and two data nodes, each a `pg_autoctl run` in its own process group.

    The data directories live in a directory of their own under the system temp dir that
    the postgres user can reach (a pytest tmp_path is 0700 under root's); logs and the
    CLI's state file go to `workdir`."""

    def __init__(
        self, workdir: Path, database: str = "ackline", fast: bool = True,
        root: Path | None = None,
    ) -> None:  # fmt: skip
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.database = database
        self.fast = fast
        self.bin = postgres_bin()
        self.root = root or postgres_dir("ackline-pgaf-")  # `adopt` passes the running one's
        self.ports = {MONITOR: free_port()}
        for name in NODES:
            self.ports[name] = free_port()
        self.procs: dict[str, Owned] = {}

    @classmethod
    def adopt(cls, workdir: Path) -> PgAutoFailover:
        """The cluster whose `save_state()` is in `workdir` (left running by `up`): crash,
        restart and switch over work on it as if this process had started it."""
        state = json.loads((Path(workdir) / STATE_FILE).read_text())
        cluster = cls(workdir, state["database"], state["fast"], Path(state["root"]))
        cluster.ports = {name: int(port) for name, port in state["ports"].items()}
        cluster.procs = {name: Owned.adopted(saved) for name, saved in state["procs"].items()}
        return cluster

    # -- addresses -------------------------------------------------------------------

    def pgdata(self, name: str) -> Path:
        return self.root / name

    def monitor_url(self) -> str:
        return f"postgresql://autoctl_node@127.0.0.1:{self.ports[MONITOR]}/pg_auto_failover"

    def dsn(self, database: str | None = None, user: str = "postgres") -> str:
        """Both data nodes in libpq's multi-host form: a client connects to whichever
        one takes writes."""
        hosts = ",".join(f"127.0.0.1:{self.ports[n]}" for n in NODES)
        return f"postgresql://{user}@{hosts}/{database or self.database}" \
               "?target_session_attrs=read-write"  # fmt: skip

    # -- processes -------------------------------------------------------------------

    def _command(self, *args: str) -> list[str]:
        """pg_autoctl as the postgres user, with its config and state kept in our root
        (not in the postgres user's home, where another cluster's could be)."""
        env = [f"XDG_CONFIG_HOME={self.root / 'config'}", f"XDG_DATA_HOME={self.root / 'share'}",
               f"XDG_RUNTIME_DIR={self.root / 'run'}",
               f"PATH={self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"]  # fmt: skip
        return [*_as_postgres(), "env", *env, pg_autoctl(), *args]

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        done = subprocess.run(self._command(*args), capture_output=True, text=True,
                              timeout=timeout, start_new_session=True, cwd=self.root)  # fmt: skip
        if done.returncode != 0:
            raise ServiceError(f"pg_autoctl {' '.join(args[:2])} failed ({done.returncode}):"
                               f" {done.stdout}{done.stderr}")  # fmt: skip
        return done.stdout

    def _spawn(self, name: str, *args: str) -> Owned:
        proc = Owned(name, self._command(*args), self.workdir / f"{name}.log", cwd=self.root)
        self.procs[name] = proc
        proc.start()
        return proc

    def _node_args(self, name: str) -> list[str]:
        return ["create", "postgres", "--pgdata", str(self.pgdata(name)),
                "--pgport", str(self.ports[name]), "--hostname", "127.0.0.1",
                "--listen", "127.0.0.1", "--name", name, "--dbname", self.database,
                "--monitor", self.monitor_url() + "?sslmode=disable", "--auth", "trust",
                "--ssl-mode", "disable", "--no-ssl", "--replication-quorum", "true",
                "--pgctl", str(self.bin / "pg_ctl"), "--run"]  # fmt: skip

    def start(self, timeout: float = 120.0) -> None:
        """Monitor, then the first node (the primary), then the second (a base backup of
        it); returns once one is primary and the other a synchronous secondary."""
        deadline = time.monotonic() + timeout
        try:
            self._run("create", "monitor", "--pgdata", str(self.pgdata(MONITOR)),
                      "--pgport", str(self.ports[MONITOR]), "--hostname", "127.0.0.1",
                      "--auth", "trust", "--ssl-mode", "disable", "--no-ssl",
                      "--pgctl", str(self.bin / "pg_ctl"), timeout=60)  # fmt: skip
            monitor = self._spawn(MONITOR, "run", "--pgdata", str(self.pgdata(MONITOR)))
            self._until(lambda: listening(self.ports[MONITOR], "tcp"), deadline, "the monitor",
                        monitor)  # fmt: skip
            if self.fast:
                self._tune_monitor()
            first = self._spawn(NODES[0], *self._node_args(NODES[0]))
            self._until(lambda: self._reported(NODES[0]) == "single", deadline,
                        f"{NODES[0]} (single)", first)  # fmt: skip
            second = self._spawn(NODES[1], *self._node_args(NODES[1]))
            self._until(lambda: self._hurry_base_backup() and self._healthy(), deadline,
                        "primary and secondary", second)  # fmt: skip
            if self.fast:
                for name in NODES:
                    for key, value in FAST_KEEPER.items():
                        self._run("config", "set", "--pgdata", str(self.pgdata(name)), key, value)
        except BaseException:
            self.close()
            raise

    def _tune_monitor(self) -> None:
        statements = [f"ALTER SYSTEM SET {k} = {v}" for k, v in FAST_MONITOR.items()]
        for sql in [*statements, "SELECT pg_reload_conf()"]:
            self._sql(self.ports[MONITOR], "pg_auto_failover", sql)

    def _hurry_base_backup(self) -> bool:
        """pg_basebackup waits for a spread checkpoint (minutes on an idle server); an
        explicit CHECKPOINT on the primary makes it finish at once."""
        if self._reported(NODES[1]) in ("wait_standby", "catchingup", ""):
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                self._sql(self.ports[NODES[0]], "postgres", "CHECKPOINT")
        return True

    def _until(self, check: Callable[[], bool], deadline: float, what: str,
               proc: Owned | None = None) -> None:  # fmt: skip
        while time.monotonic() < deadline:
            if proc is not None and proc.exited():
                raise ServiceError(f"{what}: {proc.name} exited ({proc.returncode}):\n"
                                   f"{tail(proc.log)}")  # fmt: skip
            if check():
                return
            time.sleep(0.2)
        raise ServiceError(f"{what} not ready in time:\n{self.status_text()}" + (
            f"\n{tail(proc.log)}" if proc is not None else ""))  # fmt: skip

    # -- state -----------------------------------------------------------------------

    def _sql(self, port: int, database: str, sql: str) -> list[list[str]]:
        done = subprocess.run(
            ["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", database,
             "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True, text=True, timeout=5, env={**os.environ, "PGCONNECT_TIMEOUT": "2"},
        )  # fmt: skip
        if done.returncode != 0:
            raise ServiceError(f"psql :{port}: {done.stderr.strip()}")
        return [line.split("\t") for line in done.stdout.splitlines() if line]

    def nodes(self) -> list[NodeState]:
        """What the monitor knows of each data node."""
        rows = self._sql(self.ports[MONITOR], "pg_auto_failover",
                         "SELECT nodename, nodeport, reportedstate, goalstate, health "
                         "FROM pgautofailover.node ORDER BY nodeid")  # fmt: skip
        return [NodeState(r[0], int(r[1]), r[2], r[3], int(r[4])) for r in rows]

    def _reported(self, name: str) -> str:
        with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
            for node in self.nodes():
                if node.name == name:
                    return node.reported
        return ""

    def _healthy(self) -> bool:
        try:
            states = sorted((n.reported, n.goal) for n in self.nodes())
        except (ServiceError, subprocess.TimeoutExpired):
            return False
        return states == [("primary", "primary"), ("secondary", "secondary")]

    def _writable(self, name: str) -> bool:
        try:
            return self._sql(self.ports[name], "postgres",
                             "SELECT pg_is_in_recovery()") == [["f"]]  # fmt: skip
        except (ServiceError, subprocess.TimeoutExpired):
            return False

    def primary(self) -> str:
        """The node the monitor has made primary (it may be alone: wait_primary)."""
        for node in self.nodes():
            if node.goal in WRITABLE and node.reported == node.goal:
                return node.name
        raise ServiceError(f"no primary now:\n{self.status_text()}")

    def wait_primary(self, timeout: float = 60.0, other_than: str | None = None) -> str:
        """Until a node other than `other_than` is primary and takes writes; its name."""
        found: list[str] = []

        def check() -> bool:
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                name = self.primary()
                if name != other_than and self._writable(name):
                    found.append(name)
                    return True
            return False

        self._until(check, time.monotonic() + timeout, "a new primary")
        return found[-1]

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until one node is primary and the other its synchronous secondary again."""
        self._until(self._healthy, time.monotonic() + timeout, "primary and secondary")

    def status_text(self) -> str:
        try:
            return "\n".join(f"{n.name} :{n.port} reported={n.reported} goal={n.goal} "
                             f"health={n.health}" for n in self.nodes())  # fmt: skip
        except (ServiceError, subprocess.TimeoutExpired) as exc:
            return f"(monitor unreachable: {exc})"

    # -- faults ----------------------------------------------------------------------

    def crash_primary(self) -> str:
        """SIGKILL the primary's keeper and its PostgreSQL (the whole process group:
        postmaster and backends too): no shutdown checkpoint, no goodbye to anyone."""
        name = self.primary()
        self.procs[name].kill()
        pid = self._postmaster_pid(name)
        if pid is not None:  # should have gone with its group; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return name

    def _postmaster_pid(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.pgdata(name) / "postmaster.pid").read_text().split()[0])
        return None

    def restart_node(self, name: str) -> None:
        """Start a stopped or crashed node's keeper again; it rejoins as a standby."""
        proc = self.procs.get(name)
        if proc is not None and proc.alive():
            raise ServiceError(f"{name} is running")
        self._spawn(name, "run", "--pgdata", str(self.pgdata(name)))

    def switchover(self, timeout: float = 60.0) -> tuple[str, str]:
        """A planned switchover (`pg_autoctl perform switchover`); (old, new) primary."""
        old = self.primary()
        self._run("perform", "switchover", "--pgdata", str(self.pgdata(MONITOR)),
                  "--wait", str(int(timeout)), timeout=timeout + 10)  # fmt: skip
        return old, self.wait_primary(timeout, other_than=old)

    # -- life ------------------------------------------------------------------------

    def save_state(self) -> Path:
        """What `down` needs to stop a cluster left running by `up`, and `adopt` to take
        it over."""
        running = {n: p for n, p in self.procs.items() if p.alive()}
        state = {"root": str(self.root), "ports": self.ports, "dsn": self.dsn(),
                 "database": self.database, "fast": self.fast,
                 "groups": {n: p.pid for n, p in running.items()},
                 "procs": {n: p.saved() for n, p in running.items()}}  # fmt: skip
        path = self.workdir / STATE_FILE
        path.write_text(json.dumps(state, indent=2))
        return path

    def close(self) -> None:
        """Stop the data nodes, then the monitor (each SIGTERM to its group, then SIGKILL),
        and remove the data directories."""
        for name in [*reversed(NODES), MONITOR]:
            proc = self.procs.get(name)
            if proc is not None:
                try:
                    proc.stop(timeout=15)
                except Exception as exc:  # keep stopping the others
                    log.warning("stopping %s failed: %r", name, exc, exc_info=True)
        for name in NODES:  # a postmaster that outlived its group (should not happen)
            pid = self._postmaster_pid(name)
            if pid is not None and Path(f"/proc/{pid}").exists():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgAutoFailover:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def stop_saved(workdir: Path) -> None:
    """Stop what `up` left running in `workdir`: SIGTERM each group, SIGKILL after 15 s."""
    path = workdir / STATE_FILE
    state = json.loads(path.read_text())
    groups: dict[str, int] = state["groups"]
    for name in [*reversed(NODES), MONITOR]:
        if name in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(groups[name], signal.SIGTERM)
    deadline = time.monotonic() + 15
    for name, pgid in groups.items():
        while time.monotonic() < deadline and group_running(pgid):
            time.sleep(0.1)
        if group_running(pgid):
            print(f"{name} ignored SIGTERM: killed", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    shutil.rmtree(state["root"], ignore_errors=True)
    path.unlink()


async def wait_writable(dsn: str, timeout: float = 60.0) -> float:
    """Seconds until a write commits through `dsn` (a fresh connection each try, as a
    client's pool would make after losing its connections)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.exceptions.TargetServerAttributeNotMatched, TimeoutError):  # fmt: skip
            await asyncio.sleep(0.05)
            continue
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS ha_probe (at timestamptz)")
            await conn.execute("INSERT INTO ha_probe VALUES (now())")
            return time.monotonic() - began
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.sleep(0.05)
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
    raise ServiceError(f"no write through {dsn} within {timeout:g} s")


def measure_failover(cluster: PgAutoFailover, timeout: float = 60.0) -> dict[str, Any]:
    """Crash the primary and time it until a write commits; bring the crashed node back;
    then a switchover, timed the same way."""
    asyncio.run(wait_writable(cluster.dsn(), timeout))
    crashed = cluster.crash_primary()
    crash_s = asyncio.run(wait_writable(cluster.dsn(), timeout))
    promoted = cluster.wait_primary(timeout, other_than=crashed)
    cluster.restart_node(crashed)
    began = time.monotonic()
    cluster.wait_healthy(timeout)
    rejoin_s = time.monotonic() - began
    began = time.monotonic()
    old, new = cluster.switchover(timeout)
    switch_s = time.monotonic() - began
    return {"crashed": crashed, "promoted": promoted, "crash_to_writable_s": round(crash_s, 2),
            "rejoin_s": round(rejoin_s, 2), "switchover": [old, new],
            "switchover_s": round(switch_s, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ha_postgres",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status", "failover"])
    parser.add_argument("--workdir", type=Path, help="logs and state (up, down, status)")
    parser.add_argument("--database", default="ackline")
    parser.add_argument("--slow", action="store_true", help="pg_auto_failover's own timeouts")
    args = parser.parse_args(argv)
    if args.command == "failover":
        scratch = args.workdir or Path(tempfile.mkdtemp(prefix="ackline-ha-bench-"))
        with PgAutoFailover(scratch, args.database, fast=not args.slow) as cluster:
            print(json.dumps(measure_failover(cluster), indent=2))
        return
    if args.workdir is None:
        parser.error(f"{args.command} needs --workdir")
    workdir: Path = args.workdir
    if args.command == "up":
        if (workdir / STATE_FILE).exists():
            parser.error(f"{workdir / STATE_FILE} exists: a cluster is up there (run down)")
        cluster = PgAutoFailover(workdir, args.database, fast=not args.slow)
        cluster.start()
        print(f"state: {cluster.save_state()}\n{cluster.status_text()}\n"
              f"ACKLINE_DATABASE_URL={cluster.dsn()}")  # fmt: skip
    elif args.command == "down":
        stop_saved(workdir)
    else:
        state = json.loads((workdir / STATE_FILE).read_text())
        monitor = state["ports"][MONITOR]
        done = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(monitor), "-U",
                               "postgres", "-d", "pg_auto_failover", "-c",
                               "SELECT nodename, nodeport, reportedstate, goalstate, health "
                               "FROM pgautofailover.node ORDER BY nodeid"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        print(done.stdout or done.stderr, end="")
        print(f"ACKLINE_DATABASE_URL={state['dsn']}")


if __name__ == "__main__":
    main()
