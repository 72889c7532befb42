"""The Python client against a real bus: publish (single, batch, repeated ids), history, tokens,
the documented errors, and subscriptions that resume across a kill -9 of the bus, read a compacted
backlog, and outlive their token."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Dict, List

import pytest

import eventbus_client
from eventbus_client import (
    AsyncClient,
    Backoff,
    Client,
    Forbidden,
    InvalidRequest,
    Unauthorized,
)

FAST = Backoff(initial_s=0.05, max_s=0.5)


async def until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def collect(client: AsyncClient, channel: str, into: List[Dict[str, Any]], **options: Any) -> "asyncio.Task[None]":
    async def run() -> None:
        async for event in client.subscribe(channel, **options):
            into.append(event)

    return asyncio.ensure_future(run())


def test_publish_batch_duplicates_and_history(bus) -> None:
    with Client(bus.url, token=bus.token()) as client:
        ack = client.publish({"channel": "orders", "type": "order.placed", "data": {"n": 1}})
        assert (ack.channel, ack.seq, ack.duplicate) == ("orders", 1, False)
        assert ack.id, "an id is always sent, so that a retry is safe"
        acks = client.publish_batch(
            [{"channel": "orders", "type": "order.placed", "data": {"n": n}} for n in (2, 3, 4)]
        )
        assert [a.seq for a in acks] == [2, 3, 4]
        again = client.publish({"id": ack.id, "channel": "orders", "type": "order.placed"})
        assert (again.seq, again.duplicate) == (1, True), "a repeated id is the first answer"

        page = client.history("orders", after=0, limit=2)
        assert [e["seq"] for e in page.events] == [1, 2]
        assert (page.next_after, page.head) == (2, 4)
        assert [e["data"]["n"] for e in client.iter_history("orders")] == [1, 2, 3, 4]
        assert [e["seq"] for e in client.iter_history("orders", after=3)] == [4]


def test_documented_errors_are_exceptions(bus) -> None:
    with Client(bus.url, token=bus.token()) as client:
        with pytest.raises(InvalidRequest) as invalid:
            client.publish({"channel": "orders"})
        assert invalid.value.status == 400 and invalid.value.field == "type"
        client.publish({"channel": "orders", "type": "t"})
        with pytest.raises(InvalidRequest) as beyond:
            client.history("orders", after=99)
        assert beyond.value.field == "after"
    narrowed = bus.token(sub="alice", role="client", subscribe=["orders"], publish=[])
    with Client(bus.url, token=narrowed) as client:
        with pytest.raises(Forbidden):
            client.publish({"channel": "orders", "type": "t"})
        with pytest.raises(Forbidden):
            client.history("secret")
    with Client(bus.url, token="not-a-token") as client:
        with pytest.raises(Unauthorized) as unauthorized:
            client.history("orders")
        assert unauthorized.value.status == 401


def test_a_token_minted_for_a_browser_holds_only_its_grant(bus) -> None:
    # Development mode mints without a credential; in production give api_key= or a service token.
    with Client(bus.url) as minter:
        token = minter.mint_token(sub="alice", subscribe=["orders"], ttl_s=600)
    assert token.token and token.expires_at

    async def run() -> None:
        async with AsyncClient(bus.url, token=token.token, backoff=FAST) as client:
            with pytest.raises(Forbidden):
                async for _ in client.subscribe("secret", after=0):
                    pass

    asyncio.run(run())


def test_subscribe_resumes_across_a_bus_kill_each_event_once_in_order(bus) -> None:
    publisher = Client(bus.url, token=bus.token())

    def publish(n: int) -> None:
        publisher.publish({"channel": "orders", "type": "order.placed", "data": {"n": n}})

    async def run() -> List[Dict[str, Any]]:
        seen: List[Dict[str, Any]] = []
        async with AsyncClient(bus.url, token=lambda: bus.token(), backoff=FAST) as client:
            task = collect(client, "orders", seen, after=0)
            for n in (1, 2, 3):
                publish(n)
            await until("events 1-3", lambda: len(seen) >= 3)
            bus.kill()
            bus.start()
            for n in (4, 5, 6):
                publish(n)
            await until("events 4-6 after the restart", lambda: len(seen) >= 6)
            # A resume from the wrong place would have repeated 1-3 before 4.
            publish(7)
            await until("event 7", lambda: len(seen) >= 7)
            task.cancel()
        return seen

    seen = asyncio.run(run())
    publisher.close()
    assert [e["seq"] for e in seen] == [1, 2, 3, 4, 5, 6, 7]
    assert [e["data"]["n"] for e in seen] == [1, 2, 3, 4, 5, 6, 7]


def test_a_compacted_backlog_then_live(bus) -> None:
    with Client(bus.url, token=bus.token()) as client:
        client.publish_batch(
            [
                {"channel": "board", "type": "note", "key": "a", "data": 1},
                {"channel": "board", "type": "note", "key": "b", "data": 1},
                {"channel": "board", "type": "note", "key": "a", "data": 2},
                {"channel": "board", "type": "note", "key": "b", "deleted": True},
            ]
        )

        async def run() -> List[Dict[str, Any]]:
            seen: List[Dict[str, Any]] = []
            async with AsyncClient(bus.url, token=bus.token(), backoff=FAST) as sub:
                task = collect(sub, "board", seen, after=0, compact=True)
                await until("the backlog", lambda: len(seen) >= 1)
                client.publish({"channel": "board", "type": "note", "key": "c", "data": 1})
                await until("the live event", lambda: len(seen) >= 2)
                task.cancel()
            return seen

        seen = asyncio.run(run())
    assert [(e["seq"], e.get("key"), e.get("data")) for e in seen] == [(3, "a", 2), (5, "c", 1)]


def test_a_subscription_outlives_its_token_by_refreshing_on_the_same_connection(bus, monkeypatch) -> None:
    connects = []
    real_connect = eventbus_client.client.connect

    def counting_connect(*args: Any, **kwargs: Any) -> Any:
        connects.append(args[0])
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(eventbus_client.client, "connect", counting_connect)
    minted = []

    def short_token() -> str:
        minted.append(time.time())
        return bus.token(sub="bob", role="client", subscribe=["orders"], ttl_s=3)

    publisher = Client(bus.url, token=bus.token())

    async def run() -> List[Dict[str, Any]]:
        seen: List[Dict[str, Any]] = []
        async with AsyncClient(
            bus.url, token=short_token, backoff=FAST, refresh_before_s=1.5
        ) as client:
            task = collect(client, "orders", seen, after=0)
            publisher.publish({"channel": "orders", "type": "t", "data": 1})
            await until("the first event", lambda: len(seen) >= 1)
            # Past the first token's expiry (3 s): only a refresh keeps this connection.
            first = minted[0]
            await until("the first token to expire", lambda: time.time() > first + 4, timeout=10)
            publisher.publish({"channel": "orders", "type": "t", "data": 2})
            await until("an event after the expiry", lambda: len(seen) >= 2)
            task.cancel()
        return seen

    seen = asyncio.run(run())
    publisher.close()
    assert [e["data"] for e in seen] == [1, 2]
    assert len(minted) >= 2, "a fresh token was asked for before the expiry"
    assert len(connects) == 1, "refreshed on the same connection, not reconnected after a 4001"


def test_a_publish_while_the_bus_is_down_is_retried_with_its_id_until_stored(bus) -> None:
    import threading

    with Client(bus.url, token=bus.token(), backoff=FAST, retries=60) as client:
        assert client.publish({"channel": "orders", "type": "t", "data": 1}).seq == 1
        bus.kill()
        acks = []
        publishing = threading.Thread(
            target=lambda: acks.append(client.publish({"channel": "orders", "type": "t", "data": 2}))
        )
        publishing.start()
        bus.start()
        publishing.join(timeout=60)
        assert [(a.seq, a.duplicate) for a in acks] == [(2, False)]
        assert [e["data"] for e in client.iter_history("orders")] == [1, 2], "stored once"
