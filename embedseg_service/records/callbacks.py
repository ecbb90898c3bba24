"""Webhook targets and delivery records: what a job spec's ``callback_url`` may be, and ``Job.callback``.

A callback URL is checked twice. Its syntax, with the job spec (:func:`check_url`): ``http`` or
``https``, a host, no user name or password (deliveries are authenticated by their signature), at
most :data:`MAX_URL_LENGTH` characters, no spaces or control characters. Its target, when the job
is submitted and again before every delivery attempt (:func:`resolve_target`): every address the
host resolves to must be public, or inside one of ``EMBEDSEG_WEBHOOK_ALLOWED_NETWORKS``. Loopback,
link-local (cloud metadata), private, shared and reserved addresses are refused otherwise, so that
a job cannot make the service call its own database, a metadata endpoint or the lab's intranet;
the unspecified address and multicast are refused always. An IPv4 address embedded in an IPv6
one (``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``) is judged as that IPv4 address.

The record (:func:`new_record`) is written by the transition that finishes the job, in the same
transaction (:mod:`embedseg_service.records.jobs`); :mod:`embedseg_service.records.webhooks`
delivers it and updates it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from embedseg_service.records.orm import new_id

MAX_URL_LENGTH = 2048
"""Longest accepted callback URL, in characters."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ALLOW_HINT = "webhooks go only to public addresses unless EMBEDSEG_WEBHOOK_ALLOWED_NETWORKS lists the network"
_UNSPECIFIED = "the unspecified address"
_MULTICAST = "a multicast address"


class TargetRefused(ValueError):
    """The callback URL's host is, or resolves to, an address webhooks may not reach (the message says why)."""


class UnresolvedHost(TargetRefused):
    """The callback URL's host does not resolve (now: at delivery this may pass)."""


@dataclass(frozen=True)
class Target:
    """Where a delivery goes: the URL's host and port and the checked addresses it resolves to (in order)."""

    host: str
    port: int
    addresses: tuple[IPAddress, ...]


def check_url(url: str) -> str:
    """``url`` when its syntax is acceptable for a webhook (see the module docstring); ValueError saying why not."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters, got {len(url)}")
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        got = f"{scheme}://" if scheme else "no scheme"
        raise ValueError(f"must be an http:// or https:// URL, got {got}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "must not contain a user name or password; receivers authenticate deliveries by their "
            "X-EmbedSeg-Signature header"
        )
    if not parts.hostname:
        raise ValueError("must name a host, e.g. https://pipeline.example.org/embedseg")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("has an invalid port; give a number from 1 to 65535")
    return url


def address_problem(address: IPAddress, allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """Why webhooks may not reach ``address`` (e.g. ``"a loopback address"``), or None when they may."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.is_unspecified:
        return _UNSPECIFIED
    if address.is_multicast:
        return _MULTICAST
    if any(address.version == network.version and address in network for network in allowed):
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "an internal (not globally routed) address"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    literal = _literal(host)
    if literal is not None:
        return (literal,)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UnresolvedHost(f"host {host} does not resolve ({reason})") from None
    found: dict[IPAddress, None] = {}
    for info in infos:
        found[ipaddress.ip_address(str(info[4][0]).split("%")[0])] = None
    if not found:
        raise UnresolvedHost(f"host {host} does not resolve (no addresses)")
    return tuple(found)


def resolve_target(url: str, allowed_networks: Sequence[str]) -> Target:
    """Resolve the host of a :func:`check_url`-valid ``url`` and check every address it resolves to.

    ``allowed_networks``: CIDRs reachable besides public addresses (the setting
    ``webhook_allowed_networks``). Raises :class:`UnresolvedHost` when the host does not resolve,
    :class:`TargetRefused` naming the first refused address and why.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    addresses = _resolve(host, port)
    networks = [ipaddress.ip_network(network, strict=False) for network in allowed_networks]
    for address in addresses:
        problem = address_problem(address, networks)
        if problem is not None:
            where = f"{host} is" if _literal(host) is not None else f"{host} resolves to {address},"
            hint = "webhooks never go to it" if problem in (_UNSPECIFIED, _MULTICAST) else _ALLOW_HINT
            raise TargetRefused(f"{where} {problem}; {hint}")
    return Target(host, port, addresses)


def event_name(status: str) -> str:
    """The webhook event of a job that ended in ``status``: ``job.succeeded``, ``job.failed``, ``job.cancelled``."""
    return f"job.{status}"


def new_record(url: str, status: str) -> dict[str, Any]:
    """The ``pending`` delivery record of a job that just ended in ``status`` with callback URL ``url``.

    Public keys (``JobOut.callback``): ``url``, ``event``, ``delivery_id`` (one per job, the same on
    every attempt), ``state`` (``pending``, ``delivered``, ``failed``), ``attempts``, ``last_status``
    (the receiver's last HTTP status), ``last_error``, ``delivered_at``, ``next_attempt_at``. Internal:
    ``lease`` and ``lease_until``, the process delivering it and until when (see
    :mod:`embedseg_service.records.webhooks`).
    """
    return {
        "url": url,
        "event": event_name(status),
        "delivery_id": new_id(),
        "state": "pending",
        "attempts": 0,
        "last_status": None,
        "last_error": None,
        "delivered_at": None,
        "next_attempt_at": None,
        "lease": None,
        "lease_until": None,
    }
