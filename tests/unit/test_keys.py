"""Named API keys (server.keys): the file format, constant-time identification, reloading, and quotas."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from server.keys import InvalidKeysFile, KeyRing, Quotas, RateLimited, Unauthorized, parse_keys


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_keys_file_yaml_and_json(tmp_path):
    yaml_path = write(tmp_path / "keys.yaml", f"""
keys:
  - name: team-a
    sha256: {sha("secret-a")}
    max_in_flight: 2
    requests_per_minute: 30
    weight: 2
  - name: team-b
    sha256: {sha("secret-b").upper()}
""")
    ring = KeyRing(path=yaml_path)
    a = ring.identify("Bearer secret-a")
    assert (a.name, a.max_in_flight, a.requests_per_minute, a.images_per_minute, a.weight) == (
        "team-a", 2, 30, None, 2.0)
    assert ring.identify("bearer secret-b").name == "team-b"
    json_path = write(tmp_path / "keys.json", f'[{{"name": "ci", "sha256": "{sha("x")}"}}]')
    assert KeyRing(path=json_path).identify("Bearer x").caller == "key:ci"


@pytest.mark.parametrize("data, needle", [
    ({"keys": [{"name": "a", "key": "plain"}]}, "unknown field"),
    ([{"name": "a b", "sha256": "0" * 64}], "name must be"),
    ([{"name": "a", "sha256": "abc"}], "64 hex digits"),
    ([{"name": "a", "sha256": "0" * 64, "max_in_flight": 0}], "positive integer"),
    ([{"name": "a", "sha256": "0" * 64, "weight": 1000}], "weight"),
    ([{"name": "a", "sha256": "0" * 64}, {"name": "a", "sha256": "1" * 64}], "unique"),
    ([{"name": "a", "sha256": "0" * 64}, {"name": "b", "sha256": "0" * 64}], "same sha256"),
    ("just text", "list of keys"),
])
def test_keys_file_mistakes_are_named(data, needle):
    with pytest.raises(InvalidKeysFile, match=needle):
        parse_keys(data)


def test_identify_refuses_missing_and_unknown_keys():
    ring = KeyRing(["k1", "k2"])
    assert [k.name for k in ring.keys] == ["default", "default-2"]
    assert ring.identify("Bearer k2").name == "default-2"
    for header, needle in ((None, "missing"), ("Basic k1", "missing"), ("Bearer ", "missing"),
                           ("Bearer k3", "invalid")):
        with pytest.raises(Unauthorized, match=needle):
            ring.identify(header)
    assert KeyRing().identify(None) is None  # no keys: nothing to check


def test_file_change_is_picked_up_and_a_broken_file_keeps_the_old_keys(tmp_path, monkeypatch):
    path = write(tmp_path / "keys.yaml", f"- {{name: one, sha256: {sha('first')}}}\n")
    ring = KeyRing(path=path)
    assert ring.identify("Bearer first").name == "one"
    write(tmp_path / "keys.yaml", f"- {{name: two, sha256: {sha('second')}}}\n")
    os.utime(path, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    monkeypatch.setattr("server.keys.RELOAD_CHECK", 0.0)
    assert ring.identify("Bearer second").name == "two"
    with pytest.raises(Unauthorized):
        ring.identify("Bearer first")
    write(tmp_path / "keys.yaml", "- {name: [unclosed\n")
    os.utime(path, ns=(2, 2))
    assert ring.identify("Bearer second").name == "two"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_quotas_in_flight_requests_and_images(tmp_path):
    ring = KeyRing(path=write(tmp_path / "k.yaml", f"""
- {{name: a, sha256: {sha("a")}, max_in_flight: 1}}
- {{name: r, sha256: {sha("r")}, requests_per_minute: 2}}
- {{name: i, sha256: {sha("i")}, images_per_minute: 4}}
- {{name: free, sha256: {sha("free")}}}
"""))
    a, r, i, free = (ring.identify(f"Bearer {s}") for s in ("a", "r", "i", "free"))
    clock = Clock()
    quotas = Quotas(default_in_flight=3, clock=clock)

    async def run() -> None:
        lease = await quotas.enter(a)
        with pytest.raises(RateLimited, match="in flight") as refused:
            await quotas.enter(a)
        assert refused.value.key == "a" and refused.value.retry_after > 0
        await quotas.leave(lease)
        await quotas.enter(a)  # its slot came back
        for _ in range(3):
            await quotas.enter(free)  # no limit of its own: the server's default share
        with pytest.raises(RateLimited):
            await quotas.enter(free)
        await quotas.enter(r)
        await quotas.enter(r)
        with pytest.raises(RateLimited, match="2 requests per minute") as refused:
            await quotas.enter(r)
        assert 29 < refused.value.retry_after <= 30  # one request refills in 30 s
        clock.now = 30.0
        await quotas.enter(r)
        await quotas.charge_images(i, 3)
        with pytest.raises(RateLimited, match="images per minute"):
            await quotas.charge_images(i, 2)
        clock.now += 60
        await quotas.charge_images(i, 16)  # more than a minute's worth passes once the bucket is full...
        with pytest.raises(RateLimited) as refused:
            await quotas.charge_images(i, 1)  # ...and is paid off before the next
        assert refused.value.retry_after > 60
        assert await quotas.enter(None) is None  # no keys configured: nothing is metered

    asyncio.run(run())


def test_the_readme_keys_file_parses():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if b.startswith("keys:")]
    assert blocks
    (key,) = parse_keys(yaml.safe_load(blocks[0]))
    assert key.digest == bytes.fromhex(sha("test")) and key.weight == 2


def test_a_name_or_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path / "keys.yaml", f"- {{name: default, sha256: {sha('other')}}}\n")
    with pytest.raises(InvalidKeysFile, match="names repeat"):
        KeyRing(["plain"], path)
    path = write(tmp_path / "keys.yaml", f"- {{name: a, sha256: {sha('plain')}}}\n")
    with pytest.raises(InvalidKeysFile, match="given twice"):
        KeyRing(["plain"], path)


def test_refunded_images_come_back(tmp_path):
    ring = KeyRing(path=write(tmp_path / "k.yaml", f"- {{name: i, sha256: {sha('i')}, images_per_minute: 4}}\n"))
    key = ring.identify("Bearer i")
    quotas = Quotas(clock=Clock())

    async def run() -> None:
        await quotas.charge_images(key, 4)
        with pytest.raises(RateLimited):
            await quotas.charge_images(key, 1)
        await quotas.refund_images(key, 4)  # e.g. the queue was full: no images were made
        await quotas.charge_images(key, 4)

    asyncio.run(run())


def test_redis_quotas_count_locally_while_redis_is_away_and_release_what_they_took(tmp_path):
    import redis.asyncio

    from server.queue.redis.quotas import RedisQuotas

    ring = KeyRing(path=write(tmp_path / "k.yaml", f"- {{name: a, sha256: {sha('a')}, max_in_flight: 1}}\n"))
    key = ring.identify("Bearer a")

    async def run() -> None:
        client = redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        quotas = RedisQuotas(client, "test:", 60.0)
        for _ in range(3):  # every round's slot comes back: none leaks while Redis is down
            lease = await quotas.enter(key)
            assert lease is not None and lease.local
            with pytest.raises(RateLimited):
                await quotas.enter(key)
            await quotas.leave(lease)
        assert quotas.in_flight("a") == 0
        await client.aclose()

    asyncio.run(run())


def test_a_caller_cancelled_while_admitted_gives_its_slot_back():
    from server.keys import admit

    key = KeyRing(["k"]).identify("Bearer k")

    class Slow(Quotas):
        def __init__(self) -> None:
            super().__init__(default_in_flight=1)
            self.go = asyncio.Event()

        async def enter(self, key):
            await self.go.wait()  # e.g. a round trip to Redis
            return await super().enter(key)

    async def run() -> None:
        quotas = Slow()
        caller = asyncio.create_task(admit(quotas, key))
        await asyncio.sleep(0)
        caller.cancel()  # the client went away while its slot was being taken
        quotas.go.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        for _ in range(5):
            await asyncio.sleep(0)
        assert quotas.in_flight("default") == 0

    asyncio.run(run())
