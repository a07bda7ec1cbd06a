"""Redis clients for every part of ackline, built from one URL setting.

Two kinds of URL:

* `redis://` / `rediss://` / `unix://`: one server, as redis-py reads it.
* `redis+sentinel://[:password@]host:port[,host:port...]/MASTER[/db]`: a master found
  through Sentinel. The client asks the sentinels for the master at every new
  connection, so after a failover (a connection error, or READONLY from a demoted
  master) the next command reconnects to the new master without a restart.

Every Redis user goes through here, so none of them can miss the Sentinel case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.sentinel import Sentinel as SyncSentinel

__all__ = [
    "SENTINEL_SCHEME",
    "SentinelTarget",
    "async_client",
    "parse_sentinel_url",
    "sentinel_url",
    "sync_client",
]

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
# A sentinel that does not answer is skipped for the next one within this many seconds
# (unless the caller sets its own socket timeouts).
SENTINEL_TIMEOUT = 1.0


@dataclass(frozen=True)
class SentinelTarget:
    """What a redis+sentinel:// URL names."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    password: str | None = None  # the master's (and replicas') password
    username: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def _host_port(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"Redis URL {url!r}: sentinel {item!r} has no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"Redis URL {url!r}: sentinel {item!r} has no valid port")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """`redis+sentinel://[[user]:password@]h1:p1,h2:p2/MASTER[/db]` -> SentinelTarget.

    Raises ValueError saying what is wrong: the scheme, no sentinel, a bad port, no
    master name, a db that is not a number, or anything after the db."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"Redis URL {url!r} is not {SENTINEL_SCHEME}://hosts/master[/db]")
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # redis://secret@host is read as a password, as redis-py does
            username, password = None, unquote(user) or None
    items = [h.strip() for h in hosts.split(",")]
    if not hosts or any(not h for h in items):
        raise ValueError(f"Redis URL {url!r} names no sentinel host:port (or an empty one)")
    sentinels = tuple(_host_port(h, url) for h in items)
    parts = path.split("/") if path else []
    if not parts or not parts[0]:
        raise ValueError(f"Redis URL {url!r} has no master name: .../MASTER[/db]")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"Redis URL {url!r}: after the master name only a db number may follow")
    if query:
        raise ValueError(f"Redis URL {url!r}: query options are not supported")
    db = int(parts[1]) if len(parts) == 2 else 0
    return SentinelTarget(sentinels, unquote(parts[0]), db, password, username)


def sentinel_url(sentinels: str, master: str, db: int = 0) -> str:
    """`h1:p1,h2:p2` and a master name -> the redis+sentinel:// URL (checked)."""
    hosts = ",".join(h.strip() for h in sentinels.split(","))
    url = f"{SENTINEL_SCHEME}://{hosts}/{master}" + (f"/{db}" if db else "")
    parse_sentinel_url(url)
    return url


def _master_options(target: SentinelTarget, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Options for the connections to the master; the sentinels get the socket timeouts
    (or SENTINEL_TIMEOUT) so a dead sentinel costs at most that much per lookup."""
    master = {"db": target.db, **kwargs}
    if target.password is not None:
        master.setdefault("password", target.password)
    if target.username is not None:
        master.setdefault("username", target.username)
    return master


def _sentinel_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "socket_timeout": kwargs.get("socket_timeout") or SENTINEL_TIMEOUT,
        "socket_connect_timeout": kwargs.get("socket_connect_timeout") or SENTINEL_TIMEOUT,
    }


class _BlockingSentinelPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """A sentinel-managed pool whose callers wait for a free connection when all are
    in use, as BlockingConnectionPool does, instead of failing."""


def async_client(
    url: str, *, max_connections: int | None = None, blocking_timeout: float | None = None,
    **kwargs: Any,
) -> aioredis.Redis:  # fmt: skip
    """A redis.asyncio client for `url` (see the module docstring). `blocking_timeout`:
    a pool of `max_connections` whose callers wait up to that long for a connection."""
    blocking: dict[str, Any] = {} if blocking_timeout is None else {"timeout": blocking_timeout}
    if max_connections is not None:
        blocking["max_connections"] = max_connections
    if not is_sentinel_url(url):
        if blocking_timeout is None:
            return aioredis.Redis.from_url(url, **blocking, **kwargs)
        pool = aioredis.BlockingConnectionPool.from_url(url, **blocking, **kwargs)
        return aioredis.Redis(connection_pool=pool)
    target = parse_sentinel_url(url)
    sentinel = AsyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_options(kwargs))
    pool_class = AsyncSentinelPool if blocking_timeout is None else _BlockingSentinelPool
    client: aioredis.Redis = sentinel.master_for(
        target.master, connection_pool_class=pool_class,
        **_master_options(target, kwargs), **blocking,
    )  # fmt: skip
    return client


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking redis-py client for `url` (CLI tools, benches)."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    target = parse_sentinel_url(url)
    sentinel = SyncSentinel(target.sentinels, sentinel_kwargs=_sentinel_options(kwargs))
    client: redis.Redis = sentinel.master_for(target.master, **_master_options(target, kwargs))
    return client
