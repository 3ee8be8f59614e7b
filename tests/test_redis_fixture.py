"""The Redis fixture is a real server: data round-trips, a kill loses the connection, a restart
brings an empty server back on the same port."""

from __future__ import annotations

import pytest
import redis

from tests.redis_server import RedisServer


def test_real_redis_round_trip_kill_and_restart(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert client.info("server")["redis_version"]
    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    redis_server.restart()
    assert client.get("k") is None  # no persistence: a fresh server on the same port
    client.close()
