"""The bus's documented errors as exceptions: HTTP problems (docs/protocol.md §5), WebSocket error
frames and close codes (§6). One class per kind, whichever way it arrived."""

from __future__ import annotations

from typing import Any, Mapping, Optional


class EventBusError(Exception):
    """An error the bus answered. ``status`` is the HTTP status (or None), ``code`` the WebSocket
    error code or close code (or None), ``problem`` the whole problem or error frame."""

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        code: Optional[Any] = None,
        problem: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.problem: Mapping[str, Any] = problem or {}

    @property
    def field(self) -> Optional[str]:
        """The field the bus blames, when it names one."""
        return self.problem.get("field")


class InvalidRequest(EventBusError):
    """400, or a refused frame: malformed JSON, an invalid event or field, a bad query."""


class Unauthorized(EventBusError):
    """401 or close 4001: no token, a bad or expired one."""


class Forbidden(EventBusError):
    """403: the token does not allow this channel."""


class NotFound(EventBusError):
    """404: no such route or group."""


class Conflict(EventBusError):
    """409: a durable group asked for with another channel than its own."""


class Truncated(EventBusError):
    """410: the events asked for are no longer retained. ``first_seq`` is where history starts:
    read from ``first_seq - 1`` to go on from there."""

    @property
    def first_seq(self) -> Optional[int]:
        return self.problem.get("first_seq")


class TooLarge(EventBusError):
    """413 or close 4009: an event, body or frame over its limit."""


class Overloaded(EventBusError):
    """429: publishing faster than the operator allows. ``retry_after`` in seconds, when given."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unavailable(EventBusError):
    """503: the store is unreachable or its answer never came. On a publish the outcome is
    unknown: retrying with the same ids is safe (the client does so itself)."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


_BY_STATUS = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Truncated,
    413: TooLarge,
    415: InvalidRequest,
    429: Overloaded,
    503: Unavailable,
}

_BY_CODE = {
    "bad_frame": InvalidRequest,
    "unknown_op": InvalidRequest,
    "invalid_frame": InvalidRequest,
    "invalid_channel": InvalidRequest,
    "invalid_event": InvalidRequest,
    "after_beyond_head": InvalidRequest,
    "not_subscribed": InvalidRequest,
    "already_authenticated": InvalidRequest,
    "unauthorized": Unauthorized,
    "token_expired": Unauthorized,
    "identity_mismatch": Unauthorized,
    "forbidden": Forbidden,
    "pattern_not_allowed": Forbidden,
    "group_not_allowed": Forbidden,
    "group_mismatch": Conflict,
    "group_gone": NotFound,
    "truncated": Truncated,
    "too_large": TooLarge,
    "rate_limited": Overloaded,
    "too_many_connections": Overloaded,
    "too_many_subscriptions": Overloaded,
    "unavailable": Unavailable,
}


def from_problem(
    status: int, problem: Optional[Mapping[str, Any]], retry_after: Optional[str] = None
) -> EventBusError:
    """The exception for an HTTP error answer (an RFC 9457 problem, or anything else)."""
    problem = problem or {}
    cls = _BY_STATUS.get(status, EventBusError)
    message = f"{status} {problem.get('title', 'error')}: {problem.get('detail', '')}".rstrip(": ")
    if cls is Overloaded or cls is Unavailable:
        return (Overloaded if cls is Overloaded else Unavailable)(
            message, retry_after=_seconds(retry_after), status=status, problem=problem
        )
    return cls(message, status=status, problem=problem)


def from_frame(frame: Mapping[str, Any]) -> EventBusError:
    """The exception for a WebSocket error frame."""
    code = frame.get("code")
    cls = _BY_CODE.get(str(code), EventBusError)
    return cls(f"{code}: {frame.get('message', '')}", code=code, problem=frame)


def from_close(code: Optional[int], reason: str) -> EventBusError:
    """The exception for a close code the client cannot recover from by reconnecting."""
    cls = {4001: Unauthorized, 4009: TooLarge}.get(code or 0, EventBusError)
    return cls(f"connection closed {code}: {reason}", code=code)


def _seconds(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
