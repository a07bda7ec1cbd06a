"""Processes a benchmark owns: PostgreSQL, Redis, a SIPp carrier and `ackline serve`.

Each runs in its own session (process group), so it can be killed -9 as a whole, stopped
and started again on the same port, and never sees the terminal's Ctrl-C: the bench
decides when it ends. `Services` remembers everything it started and stops all of it on
close, whatever happened before (an exception, Ctrl-C, a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple, Protocol

import httpx
import redis.asyncio as aioredis

from bench.ports import free_media_port, listening
from storage.redis_client import async_client

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


class ServiceError(RuntimeError):
    """A service did not start or stop as it should; the message says which and why."""


def tail(path: Path, lines: int = 20) -> str:
    """The end of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def running(pid: int) -> bool:
    """Whether `pid` is a live process. A zombie is not: a process whose parent exited
    (what `python -m bench.ha up` leaves) stays one after its death where PID 1 does not
    reap, and signalling it still succeeds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def group_running(pgid: int) -> bool:
    """Whether any process of the group is live (zombies aside, as in `running`)."""
    for path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = path.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


class Owned:
    """One child process in its own session, its output in a log file (appended to across
    restarts, so a killed run's last words stay next to the next run's first).

    A process another run started and left running (`python -m bench.ha up`) can be
    adopted from what `saved()` recorded: `pid`, `alive()`, `kill()` and `stop()` then act
    on its group, and `start()` spawns it anew from the same command."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.adopted_pid: int | None = None  # not our child: nobody here can wait for it
        self._out: IO[bytes] | None = None

    def saved(self) -> dict[str, Any]:
        """What `adopt` needs (the environment is left out: it is rebuilt, and a shell's
        secrets have no business in a state file)."""
        return {"name": self.name, "pid": self.pid, "cmd": self.cmd, "log": str(self.log),
                "cwd": None if self.cwd is None else str(self.cwd)}  # fmt: skip

    def adopt(self, saved: Mapping[str, Any]) -> None:
        self.cmd = list(saved["cmd"])
        self.log = Path(saved["log"])
        self.cwd = None if saved["cwd"] is None else Path(saved["cwd"])
        self.process = None
        self.adopted_pid = int(saved["pid"])

    @classmethod
    def adopted(cls, saved: Mapping[str, Any]) -> Owned:
        """A plain Owned for a saved process (a subclass builds itself, then `adopt`s)."""
        proc = Owned(saved["name"], [], Path(saved["log"]))
        proc.adopt(saved)
        return proc

    def start(self) -> None:
        if self.alive():
            raise ServiceError(f"{self.name} is already running")
        self._close_log()
        self._out = open(self.log, "ab")  # noqa: SIM115 - closed in _close_log
        self.process = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        self.adopted_pid = None

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise ServiceError(f"{self.name} was never started")
        return self.process

    @property
    def pid(self) -> int:
        return self.adopted_pid if self.adopted_pid is not None else self.popen.pid

    @property
    def started(self) -> bool:
        return self.process is not None or self.adopted_pid is not None

    @property
    def returncode(self) -> int | None:
        """The exit status, None while running or for an adopted process."""
        return None if self.process is None else self.process.poll()

    def alive(self) -> bool:
        if self.adopted_pid is not None:
            return running(self.adopted_pid)
        return self.process is not None and self.process.poll() is None

    def exited(self) -> bool:
        """Started (or adopted) once and gone since: a wait for it to be ready can stop."""
        return self.started and not self.alive()

    def _wait(self, timeout: float) -> bool:
        """Until the process is gone (reaped, when it is our child); False on timeout."""
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.alive()

    def kill(self) -> None:
        """SIGKILL the whole process group and reap the child: no goodbye of any kind."""
        if not self.started:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._wait(10)
        self._close_log()

    def stop(self, timeout: float = 15.0) -> float | None:
        """SIGTERM the group, then SIGKILL what is left after `timeout` seconds. Returns
        how long the process took to exit, None when it had to be killed (or was not
        running)."""
        took: float | None = None
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            began = time.monotonic()
            if self._wait(timeout):
                took = time.monotonic() - began
            else:
                print(f"{self.name} ignored SIGTERM for {timeout:g} s: killed", file=sys.stderr)
        self.kill()  # also what the group's other members left behind
        return took

    def _close_log(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def postgres_bin() -> Path:
    """The newest installed server binaries (Debian: /usr/lib/postgresql/<version>/bin)."""
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise ServiceError("PostgreSQL server binaries not found under /usr/lib/postgresql")
    return versions[-1]


def postgres_dir(prefix: str) -> Path:
    """A new directory the postgres user owns, under the system temp dir: PostgreSQL
    refuses to run as root, and a pytest tmp_path (0700, root's) is out of its reach."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    return path


class Postgres:
    """A throwaway cluster on its own port and data directory (in a directory of its own
    the postgres user can reach, removed on close; its log is copied to `log` first)."""

    def __init__(
        self, port: int, log: Path, settings: Mapping[str, str] | None = None,
        root: Path | None = None,
    ) -> None:  # fmt: skip
        self.port = port
        self.log = log
        self.settings = dict(settings or {})
        self.bin = postgres_bin()
        self.root = root or postgres_dir("ackline-bench-pg-")  # `adopt` passes the running one's
        self.data = self.root / "data"
        self.pid: int | None = None  # the postmaster's, for a last-resort kill

    def saved(self) -> dict[str, Any]:
        return {"port": self.port, "log": str(self.log), "root": str(self.root), "pid": self.pid}

    @classmethod
    def adopt(cls, saved: Mapping[str, Any]) -> Postgres:
        """The server `saved()` described, left running by another run."""
        pg = cls(int(saved["port"]), Path(saved["log"]), root=Path(saved["root"]))
        pg.pid = saved["pid"]
        return pg

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        cmd = [*_as_postgres(), *args]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, start_new_session=True
        )
        if done.returncode != 0:
            raise ServiceError(
                f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}"
                f"\n{tail(self.root / 'postgres.log')}"
            )

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres", "-E", "UTF8", "--no-sync")  # fmt: skip

    def start(self) -> None:
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1",
                   f"-c unix_socket_directories={self.root}",
                   *(f"-c {k}={v}" for k, v in self.settings.items())]  # fmt: skip
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "postgres.log"), "-w", "-t", "60", "-o", " ".join(options),
                  "start")  # fmt: skip
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: no checkpoint, crash recovery at the next start."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                  "stop")  # fmt: skip

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                          "-t", "20", "stop")  # fmt: skip
        except (ServiceError, subprocess.TimeoutExpired) as exc:
            print(f"postgres did not stop cleanly ({exc}): killed", file=sys.stderr)
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(self.pid), signal.SIGKILL)
        finally:
            with contextlib.suppress(OSError):
                shutil.copyfile(self.root / "postgres.log", self.log)
            shutil.rmtree(self.root, ignore_errors=True)


class Redis(Owned):
    """redis-server without persistence: a restart starts empty, as after a crash."""

    def __init__(self, port: int, workdir: Path) -> None:
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
        super().__init__("redis", cmd, workdir / "redis.log")
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"

    async def wait_ready(self, timeout: float = 15.0) -> None:
        await wait_for(self._pong, timeout, "redis", self)

    async def _pong(self) -> bool:
        client = aioredis.from_url(self.url, socket_timeout=1)
        try:
            return bool(await client.ping())
        except (aioredis.RedisError, OSError):
            return False
        finally:
            await client.aclose()


class Invite(NamedTuple):
    """One call as the carrier saw it arrive."""

    at: float  # Unix time
    call_id: str
    via_port: int | None  # the caller's SIP port: which worker placed it


# "INVITE at=<date>\t<time>\t<unix time> via_port=<port> call_id=<id>" (carrier_chaos.xml)
_INVITE_LINE = re.compile(r"INVITE at=\S+\t\S+\t(?P<at>[\d.]+) via_port=(?P<port>\S*) "
                          r"call_id=(?P<call_id>\S+)")  # fmt: skip


class SippCarrier(Owned):
    """A SIPp UAS standing in for the carrier (bench/carrier_chaos.xml): the callee of
    `press_number` presses 1, every other callee stays silent. It logs one line per INVITE
    in a file per SIPp process, so the calls that reached it are counted over all its
    lives."""

    SCENARIO = Path(__file__).with_name("carrier_chaos.xml")

    def __init__(
        self, port: int, workdir: Path, press_number: str, pcap: Path, ring_ms: int = 100,
        pause_ms: int = 800, trace_messages: bool = False,
    ) -> None:  # fmt: skip
        if shutil.which("sipp") is None:
            raise ServiceError("sipp is not installed (Debian package sip-tester)")
        workdir.mkdir(parents=True, exist_ok=True)
        text = self.SCENARIO.read_text()
        values = {"PRESS_NUMBER": press_number.lstrip("+"), "RING_MS": str(ring_ms),
                  "PAUSE_MS": str(pause_ms), "PCAP": str(pcap)}  # fmt: skip
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        scenario = workdir / self.SCENARIO.name
        scenario.write_text(text)
        cmd = ["sipp", "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(port), "-mi",
               "127.0.0.1", "-mp", str(free_media_port(avoid=port)), "-t", "u1", "-m",
               "100000000", "-max_socket", "1024", "-nostdin", "-trace_logs",
               "-trace_err", *(["-trace_msg"] if trace_messages else [])]  # fmt: skip
        super().__init__("carrier", cmd, workdir / "sipp.out", cwd=workdir)
        self.port = port
        self.workdir = workdir

    async def wait_ready(self, timeout: float = 10.0) -> None:
        async def bound() -> bool:
            return listening(self.port, "udp")

        await wait_for(bound, timeout, "the SIPp carrier", self)

    def invites(self) -> list[Invite]:
        """Every INVITE any of its processes received (a retransmission is not a new one)."""
        calls: list[Invite] = []
        for path in sorted(self.workdir.glob("*_logs.log")):
            for line in path.read_text(errors="replace").splitlines():
                match = _INVITE_LINE.match(line)
                if match is not None:
                    port = int(match["port"]) if match["port"].isdigit() else None
                    calls.append(Invite(float(match["at"]), match["call_id"], port))
        return calls


def ackline_command() -> list[str]:
    """The installed console script, run by this interpreter's environment."""
    exe = Path(sys.executable).parent / "ackline"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from api.cli import main; main()"]


def service_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any ackline, Redis, database or channel setting
    (a developer's shell must not leak into the bench), plus `overrides`; PYTHONPATH
    makes the children run this checkout's code."""
    dropped = ("ACKLINE_", "TWILIO_", "TELEGRAM_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(dropped)
        and k not in ("REDIS_URL", "REDIS_SENTINELS", "REDIS_MASTER_NAME", "DATABASE_URL")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env


async def wait_for(
    check: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    process: Owned | None = None,
) -> None:
    """Poll a check until it holds; fail at once if `process` died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.exited():
            raise ServiceError(f"{what} exited ({process.returncode}):\n"
                               f"{tail(process.log)}")  # fmt: skip
        if await check():
            return
        await asyncio.sleep(0.05)
    raise ServiceError(f"{what} not ready within {timeout:g} s" + (
        f":\n{tail(process.log)}" if process is not None else ""))  # fmt: skip


async def wait_http_ready(client: httpx.AsyncClient, proc: subprocess.Popen[bytes]) -> None:
    """Until GET /readyz answers 200 (database and Redis answer), at most 30 s."""
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit("the API process exited during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise SystemExit("the API did not become ready")


async def wait_subscribed(
    redis_url: str, prefix: str, workers: int, procs: Sequence[subprocess.Popen[bytes]]
) -> None:
    """Until `workers` processes listen for wake-ups (a worker claims right after
    subscribing), not after a guessed pause: a worker still importing would otherwise
    show up as hand-off latency of the first alerts."""
    r = async_client(redis_url)
    try:
        for _ in range(600):
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"a benchmark process exited early ({p.returncode})")
            [(_, subscribed)] = await r.pubsub_numsub(f"{prefix}:wake")
            if subscribed >= workers:
                await asyncio.sleep(0.2)  # the first (empty) claim pass
                return
            await asyncio.sleep(0.1)
        raise SystemExit("the workers did not subscribe")
    finally:
        await r.aclose()


class Closable(Protocol):
    """A service made of several processes (a database cluster, a Sentinel set)."""

    def close(self) -> None: ...


class Services:
    """Everything a bench started, stopped in reverse order on close (also after Ctrl-C
    or an exception: use it as a context manager around the run)."""

    def __init__(self) -> None:
        self._owned: list[Owned | Closable] = []

    def add(self, service: Owned | Closable) -> None:
        self._owned.append(service)

    def owned(self) -> list[Owned | Closable]:
        return list(self._owned)

    def close(self) -> None:
        for service in reversed(self._owned):
            try:
                if isinstance(service, Owned):
                    service.stop()
                else:
                    service.close()
            except Exception as exc:  # keep stopping the others; say what was left
                log.warning("stopping %s failed: %r", service, exc, exc_info=True)
        self._owned.clear()

    def __enter__(self) -> Services:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
