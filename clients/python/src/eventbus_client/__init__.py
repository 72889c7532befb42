"""eventbus for Python: publish with safe retries, subscribe with resume, history, tokens.

    from eventbus_client import Client, AsyncClient
"""

from .client import Ack, AsyncClient, Backoff, Client, Event, Page, Token, TokenSource
from .errors import (
    Conflict,
    EventBusError,
    Forbidden,
    InvalidRequest,
    NotFound,
    Overloaded,
    TooLarge,
    Truncated,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "Ack",
    "AsyncClient",
    "Backoff",
    "Client",
    "Conflict",
    "Event",
    "EventBusError",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "Overloaded",
    "Page",
    "Token",
    "TokenSource",
    "TooLarge",
    "Truncated",
    "Unauthorized",
    "Unavailable",
]
