"""Clients of one bus: :class:`Client` (sync, for scripts and web backends) and
:class:`AsyncClient` (asyncio, with :meth:`AsyncClient.subscribe`). Both share one definition of
every request, answer and retry (the functions below); they differ only in how they wait."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .errors import (
    Overloaded,
    Unavailable,
    from_close,
    from_frame,
    from_problem,
)

Event = Dict[str, Any]
"""An event: a CloudEvents 1.0 structured event as a dict (docs/protocol.md §1). A stored event
has ``seq`` too. Publish one as you would any structured CloudEvent: ``channel`` and ``type`` at
least."""

TokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]]]
"""A token, or a function giving one (called at every connect and before expiry)."""


@dataclass(frozen=True)
class Ack:
    """A published event, durable: its ``seq``, or the first answer's for a repeated ``id``."""

    id: str
    channel: str
    seq: int
    duplicate: bool


@dataclass(frozen=True)
class Page:
    """A page of history: ``events`` in seq order; pass ``next_after`` as ``after`` for the next."""

    events: List[Event]
    next_after: int
    head: int


@dataclass(frozen=True)
class Token:
    token: str
    expires_at: str


# Publishes are retried (with the same ids) on these; the outcome of a 503 is unknown, and an id
# makes a repeat harmless (the bus answers it as a duplicate of the stored event).
_RETRIED = (Unavailable, Overloaded, httpx.TransportError)


def _with_ids(events: Sequence[Mapping[str, Any]]) -> List[Event]:
    """Copies of the events, each with an ``id``: given before the first send, kept across retries."""
    out = []
    for event in events:
        event = dict(event)
        event.setdefault("id", str(uuid.uuid4()))
        out.append(event)
    return out


def _check(response: httpx.Response) -> Any:
    """The answer's JSON, or the documented exception for an error answer."""
    if response.status_code == 200:
        return response.json()
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text[:200]}
    raise from_problem(
        response.status_code,
        problem if isinstance(problem, dict) else None,
        response.headers.get("retry-after"),
    )


def _acks(answer: Mapping[str, Any]) -> List[Ack]:
    return [Ack(a["id"], a["channel"], a["seq"], a["duplicate"]) for a in answer["events"]]


def _history_params(after: int, limit: int, compact: bool) -> Dict[str, str]:
    params = {"after": str(after), "limit": str(limit)}
    if compact:
        params["compact"] = "true"
    return params


def _page(answer: Mapping[str, Any]) -> Page:
    return Page(list(answer["events"]), answer["next_after"], answer["head"])


def _retry_delay(attempt: int, error: BaseException, backoff: "Backoff") -> float:
    given = getattr(error, "retry_after", None)
    return given if given is not None else backoff.delay(attempt)


def _channel_path(channel: str) -> str:
    # Channel names are [A-Za-z0-9_-] tokens joined by '.': nothing to escape.
    return f"/v1/channels/{channel}/events"


def _token_expiry(token: str) -> Optional[float]:
    """A JWT's ``exp`` (not verified: the bus does that), to refresh before it."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, KeyError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class Backoff:
    """Exponential, capped, with "equal jitter" (at least half of each step), as the JS client."""

    initial_s: float = 0.25
    max_s: float = 10.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 30))
        return ceiling / 2 + random.random() * ceiling / 2


class Client:
    """A synchronous client: publish, read history, mint tokens.

    ``token`` is a token, or a function returning one (called for every request, so it may
    refresh). ``api_key`` is for minting tokens with an API key.
    """

    def __init__(
        self,
        url: str,
        token: Optional[Union[str, Callable[[], str]]] = None,
        *,
        api_key: Optional[str] = None,
        timeout: float = 15.0,
        retries: int = 5,
        backoff: Backoff = Backoff(),
    ) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._token = token
        self._api_key = api_key
        self._retries = retries
        self._backoff = backoff

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _auth(self, credential: Optional[str] = None) -> Dict[str, str]:
        token = credential or (self._token() if callable(self._token) else self._token)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def publish(self, event: Mapping[str, Any]) -> Ack:
        """Publishes one event; returns once it is durable."""
        return self.publish_batch([event])[0]

    def publish_batch(self, events: Sequence[Mapping[str, Any]]) -> List[Ack]:
        """Publishes up to 1000 events as one request (all or none), in order."""
        body = _with_ids(events)
        for attempt in range(self._retries + 1):
            try:
                response = self._http.post("/v1/events", json=body, headers=self._auth())
                return _acks(_check(response))
            except _RETRIED as error:
                if attempt == self._retries:
                    raise
                time.sleep(_retry_delay(attempt, error, self._backoff))
        raise AssertionError("unreachable")

    def history(self, channel: str, *, after: int = 0, limit: int = 100, compact: bool = False) -> Page:
        """One page of a channel's events after ``after``."""
        response = self._http.get(
            _channel_path(channel),
            params=_history_params(after, limit, compact),
            headers=self._auth(),
        )
        return _page(_check(response))

    def iter_history(self, channel: str, *, after: int = 0, compact: bool = False) -> Iterator[Event]:
        """Every event after ``after`` up to the head as it was at the start, page by page."""
        page = self.history(channel, after=after, limit=1000, compact=compact)
        head = page.head
        while True:
            yield from page.events
            if not page.events or page.next_after >= head:
                return
            page = self.history(channel, after=page.next_after, limit=1000, compact=compact)

    def mint_token(self, **claims: Any) -> Token:
        """``POST /v1/tokens`` (docs/protocol.md §2) with the API key or this client's token:
        e.g. ``mint_token(sub="alice", subscribe=["orders"], ttl_s=3600)`` for a browser."""
        response = self._http.post(
            "/v1/tokens", json=claims, headers=self._auth(self._api_key)
        )
        answer = _check(response)
        return Token(answer["token"], answer["expires_at"])


class _Reconnect(Exception):
    """Internal: the connection ended in a way a reconnect and resume recovers from."""


class AsyncClient:
    """An asyncio client: everything :class:`Client` does, and :meth:`subscribe`.

    ``token`` is a token, or a function (sync or async) returning one: it is called at every
    connect and before the token expires, so a long subscription never ends with 4001.
    """

    def __init__(
        self,
        url: str,
        token: Optional[TokenSource] = None,
        *,
        api_key: Optional[str] = None,
        timeout: float = 15.0,
        retries: int = 5,
        backoff: Backoff = Backoff(),
        refresh_before_s: float = 60.0,
    ) -> None:
        base = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=base, timeout=timeout)
        self._ws_url = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/v1/ws"
        self._token_source = token
        self._api_key = api_key
        self._retries = retries
        self._backoff = backoff
        self._refresh_before_s = refresh_before_s

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _token(self) -> Optional[str]:
        source = self._token_source
        if not callable(source):
            return source
        token = source()
        if inspect.isawaitable(token):
            token = await token
        return token

    async def _auth(self, credential: Optional[str] = None) -> Dict[str, str]:
        token = credential or await self._token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def publish(self, event: Mapping[str, Any]) -> Ack:
        """Publishes one event; returns once it is durable."""
        return (await self.publish_batch([event]))[0]

    async def publish_batch(self, events: Sequence[Mapping[str, Any]]) -> List[Ack]:
        """Publishes up to 1000 events as one request (all or none), in order."""
        body = _with_ids(events)
        for attempt in range(self._retries + 1):
            try:
                response = await self._http.post("/v1/events", json=body, headers=await self._auth())
                return _acks(_check(response))
            except _RETRIED as error:
                if attempt == self._retries:
                    raise
                await asyncio.sleep(_retry_delay(attempt, error, self._backoff))
        raise AssertionError("unreachable")

    async def history(
        self, channel: str, *, after: int = 0, limit: int = 100, compact: bool = False
    ) -> Page:
        """One page of a channel's events after ``after``."""
        response = await self._http.get(
            _channel_path(channel),
            params=_history_params(after, limit, compact),
            headers=await self._auth(),
        )
        return _page(_check(response))

    async def iter_history(
        self, channel: str, *, after: int = 0, compact: bool = False
    ) -> AsyncIterator[Event]:
        """Every event after ``after`` up to the head as it was at the start, page by page."""
        page = await self.history(channel, after=after, limit=1000, compact=compact)
        head = page.head
        while True:
            for event in page.events:
                yield event
            if not page.events or page.next_after >= head:
                return
            page = await self.history(channel, after=page.next_after, limit=1000, compact=compact)

    async def mint_token(self, **claims: Any) -> Token:
        """``POST /v1/tokens`` with the API key or this client's token (see :meth:`Client.mint_token`)."""
        response = await self._http.post(
            "/v1/tokens", json=claims, headers=await self._auth(self._api_key)
        )
        answer = _check(response)
        return Token(answer["token"], answer["expires_at"])

    async def subscribe(
        self, channel: str, *, after: Optional[int] = None, compact: bool = False
    ) -> AsyncIterator[Event]:
        """The events of ``channel``, live, as an async iterator that never gives one twice or
        out of order. With ``after``, the history after that seq comes first (``compact``: only
        the newest event per key). After any drop (network, a bus restart, slow-consumer close)
        it reconnects with backoff and resumes after the last seq it gave you.

        Raises the documented error when resuming cannot help: :class:`~.errors.Forbidden`,
        :class:`~.errors.Truncated` (history no longer retained), :class:`~.errors.Unauthorized`
        (a fixed token that expired, or a token source that gives bad tokens).
        """
        last = after
        attempt = 0
        while True:
            try:
                async with connect(self._ws_url, max_size=2**20) as ws:
                    token = await self._token()
                    await ws.send(json.dumps({"op": "hello", "token": token}))
                    welcome = json.loads(await ws.recv())
                    if welcome.get("op") != "welcome":
                        raise from_frame(welcome)
                    frame: Dict[str, Any] = {"op": "subscribe", "channel": channel}
                    if last is not None:
                        frame["after"] = last
                        # Compaction is for the first read; a resume needs every event after.
                        if compact and last == after:
                            frame["compact"] = True
                    await ws.send(json.dumps(frame))
                    refresher = None
                    if callable(self._token_source) and token:
                        refresher = asyncio.ensure_future(self._refresh(ws, token))
                    try:
                        async for raw in ws:
                            message = json.loads(raw)
                            op = message.get("op")
                            if op == "subscribed":
                                attempt = 0
                                if last is None:
                                    last = message.get("head") or 0
                            elif op == "event":
                                event = message["event"]
                                # The connection's inbox arrives unasked: not this subscription's.
                                if event.get("channel") != channel:
                                    continue
                                if last is not None and event["seq"] <= last:
                                    continue
                                last = event["seq"]
                                yield event
                            elif op == "error":
                                error = from_frame(message)
                                # An expired token ends the connection (4001); a token function
                                # gives the next connect a fresh one.
                                expired = message.get("code") == "token_expired"
                                if isinstance(error, (Unavailable, Overloaded)) or (
                                    expired and callable(self._token_source)
                                ):
                                    raise _Reconnect() from error
                                raise error
                    finally:
                        if refresher is not None:
                            refresher.cancel()
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd is not None else None
                reason = closed.rcvd.reason if closed.rcvd is not None else ""
                # 4001 with a token source: the next connect asks it for a fresh token.
                if code == 4009 or (code == 4001 and not callable(self._token_source)):
                    raise from_close(code, reason) from closed
                if code == 4000:
                    raise from_close(code, reason) from closed
            except (_Reconnect, OSError, InvalidHandshake, asyncio.TimeoutError):
                pass
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _refresh(self, ws: Any, token: str) -> None:
        """Sends ``refresh`` with a fresh token before the current one expires."""
        while True:
            expires = _token_expiry(token)
            if expires is None:
                return
            await asyncio.sleep(max(0.0, expires - time.time() - self._refresh_before_s))
            token = await self._token() or ""
            await ws.send(json.dumps({"op": "refresh", "token": token}))


