"""Broker addresses as one setting: a URL, or several URLs of one RabbitMQ cluster separated by
commas (``amqp://u:p@node1:5672/,amqp://u:p@node2:5672/``). Every process, cells included, takes
the same form; a connection tries the nodes in turn (``common.bus.connection.ClusterConnection``).

The nodes of one cluster share users and vhosts, so the user, password and vhost are read from
the first URL and applied to all when a password changes.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit, urlunsplit

SCHEMES = ("amqp", "amqps")


def split(value: str) -> list[str]:
    """The URLs in a broker setting, in order; ``ValueError`` naming the bad part."""
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("no broker URL given")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(f"{_redact_one(url)!r} is not an amqp:// or amqps:// URL with a host")
    if len({urlsplit(url).scheme for url in urls}) > 1:
        raise ValueError("mixes amqp:// and amqps:// URLs; the nodes of a cluster take one")
    return urls


def first(value: str) -> str:
    return split(value)[0]


def each(value: str, change: Callable[[str], str]) -> str:
    """The setting with ``change`` applied to every URL in it."""
    return ",".join(change(url) for url in split(value))


def user(value: str) -> str:
    """The user the URLs authenticate as: what the broker will insist on as ``user_id``."""
    return unquote(urlsplit(first(value)).username or "guest")


def vhost(value: str) -> str:
    path = urlsplit(first(value)).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def is_tls(value: str) -> bool:
    return first(value).startswith("amqps://")


def _netloc(user: str, password: str, host: str, port: int | None) -> str:
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return f"{netloc}:{port}" if port else netloc


def with_credentials(value: str, user: str, password: str) -> str:
    """Every URL with this user and password, host, port and vhost kept."""

    def change(url: str) -> str:
        parts = urlsplit(url)
        netloc = _netloc(user, password, parts.hostname or "127.0.0.1", parts.port)
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))

    return each(value, change)


def with_password(value: str, password: str) -> str:
    return with_credentials(value, user(value), password)


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def redact(value: str) -> str:
    """The setting fit for a log line: every password replaced."""
    return ",".join(_redact_one(part.strip()) for part in value.split(",") if part.strip())
