"""Redis URLs: plain ones as redis-py reads them, redis+sentinel:// ones parsed here."""

from __future__ import annotations

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from api.settings import Settings, redis_url_from_env
from storage.redis_client import (
    SentinelTarget,
    async_client,
    parse_sentinel_url,
    sentinel_url,
    sync_client,
)


def test_parses_hosts_master_and_db() -> None:
    got = parse_sentinel_url("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster/2")
    assert got == SentinelTarget((("10.0.0.1", 26379), ("10.0.0.2", 26380)), "mymaster", 2)


def test_defaults_db_0_and_port_26379_and_reads_a_password() -> None:
    got = parse_sentinel_url("redis+sentinel://:s%40cret@sentinel-a,[::1]:26381/cache")
    assert got.sentinels == (("sentinel-a", 26379), ("::1", 26381))
    assert (got.master, got.db, got.password, got.username) == ("cache", 0, "s@cret", None)


def test_reads_a_username_and_password() -> None:
    got = parse_sentinel_url("redis+sentinel://ack:pw@h:1/m")
    assert (got.username, got.password) == ("ack", "pw")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://h:6379/0", "is not redis\\+sentinel"),
        ("redis+sentinel:///mymaster", "names no sentinel"),
        ("redis+sentinel://h:1,,h:2/m", "names no sentinel"),
        ("redis+sentinel://h:1", "no master name"),
        ("redis+sentinel://h:1/", "no master name"),
        ("redis+sentinel://h:port/m", "no valid port"),
        ("redis+sentinel://h:70000/m", "no valid port"),
        ("redis+sentinel://:1/m", "has no host"),
        ("redis+sentinel://h:1/m/x", "only a db number"),
        ("redis+sentinel://h:1/m/0/extra", "only a db number"),
        ("redis+sentinel://h:1/m?ssl=true", "query options"),
    ],
)
def test_a_bad_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_sentinel_url(url)


def test_sentinel_url_from_a_host_list() -> None:
    assert sentinel_url(" a:1, b:2 ", "m") == "redis+sentinel://a:1,b:2/m"
    assert sentinel_url("a:1", "m", 3) == "redis+sentinel://a:1/m/3"
    with pytest.raises(ValueError, match="has no valid port"):
        sentinel_url("a:x", "m")


def test_settings_take_redis_url_or_build_it_from_the_sentinels() -> None:
    assert redis_url_from_env({}) is None
    assert redis_url_from_env({"REDIS_URL": "redis://h/1"}) == "redis://h/1"
    env = {"REDIS_SENTINELS": "s1:26379,s2:26379"}
    assert redis_url_from_env(env) == "redis+sentinel://s1:26379,s2:26379/mymaster"
    env["REDIS_MASTER_NAME"] = "ack"
    assert Settings.from_env(env).redis_url == "redis+sentinel://s1:26379,s2:26379/ack"
    with pytest.raises(ValueError, match="not both"):
        redis_url_from_env({**env, "REDIS_URL": "redis://h"})


async def test_clients_for_a_sentinel_url_ask_the_sentinels_for_the_master() -> None:
    """Nothing is connected until the first command: built offline, checked by shape."""
    client = async_client("redis+sentinel://127.0.0.1:1,127.0.0.1:2/m/4", socket_timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert (pool.service_name, pool.is_master) == ("m", True)
    assert pool.connection_kwargs["db"] == 4
    assert pool.connection_kwargs["socket_timeout"] == 3
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
    await client.aclose()
    blocking = async_client("redis+sentinel://127.0.0.1:1/m", max_connections=3,
                            blocking_timeout=5)  # fmt: skip
    assert blocking.connection_pool.max_connections == 3
    await blocking.aclose()
    sync = sync_client("redis+sentinel://127.0.0.1:1/m")
    assert sync.connection_pool.service_name == "m"  # type: ignore[attr-defined]
    sync.close()


async def test_plain_urls_are_redis_py_urls() -> None:
    client = async_client("redis://127.0.0.1:6390/5")
    assert client.connection_pool.connection_kwargs["db"] == 5
    await client.aclose()
    assert sync_client("redis://127.0.0.1:6390/1").connection_pool.connection_kwargs["db"] == 1
