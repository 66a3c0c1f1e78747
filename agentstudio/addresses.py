"""The outbound address policy every request we send on a tenant's behalf follows: reserved
documentation domains are never contacted, and api_call targets must be public addresses unless an
Agent allows the host (a guard against requests into our own network, SSRF)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import httpx

# Reserved for documentation (RFC 2606/6761): nothing answers there, so nothing is ever sent there
# (the examples' placeholder URL must not send a campaign's data anywhere).
_RESERVED = (".example", ".invalid", ".test", "example.com", "example.net", "example.org")


def reserved_host(url: str) -> bool:
    """Whether `url`'s host is a reserved documentation domain (example.com, *.test, ...)."""
    host = (httpx.URL(url).host or "").lower().rstrip(".")
    return any(host == r.lstrip(".") or host.endswith(r if r.startswith(".") else "." + r) for r in _RESERVED)


# Names that only mean something inside a host or cluster (".local" covers ".cluster.local").
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".svc")
_SHARED = IPv4Network("100.64.0.0/10")  # carrier-grade NAT; cloud providers put services here too
_NAT64 = IPv6Network("64:ff9b::/96")


class Refused(Exception):
    """The request was not sent; str() says why in words fit for the model and the transcript."""


def _non_public(ip: IPv4Address | IPv6Address) -> str | None:
    """What kind of non-public address `ip` is, or None when the public internet reaches it."""
    if isinstance(ip, IPv6Address):
        # These IPv6 forms are delivered to the IPv4 address they carry: judge that one.
        carried = ip.ipv4_mapped or ip.sixtofour
        if carried is None and ip in _NAT64:
            carried = IPv4Address(int(ip) & 0xFFFFFFFF)
        if carried is not None:
            return _non_public(carried)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, IPv4Address) and ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:  # RFC 1918, unique local, and the other special-purpose ranges
        return "private"
    return None


async def guard(url: str, allowed_hosts: Sequence[str]) -> list[str]:
    """The IP addresses `url` may be sent to (resolved once), or raises Refused."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise Refused("the URL is not valid") from None
    if parsed.scheme not in ("http", "https"):
        raise Refused("only http and https URLs may be called")
    if parsed.userinfo:
        raise Refused("URLs with a user name or password are not allowed")
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise Refused("the URL has no host")
    if reserved_host(url):
        raise Refused(f"{host} is reserved for documentation; nothing answers there")
    allowed = {h.strip().lower().strip("[]").rstrip(".") for h in allowed_hosts}
    trusted = host in allowed or parsed.host.lower().rstrip(".") in allowed

    try:
        literal = ip_address(host)
    except ValueError:
        literal = None  # a name
    if literal is not None:
        return [_checked(literal, f"{host} is", trusted)]
    if not trusted and (host == "localhost" or host.endswith(_INTERNAL_SUFFIXES) or "." not in host):
        # Single labels are how Kubernetes services are reached from inside the cluster.
        raise Refused(f"{host} is an internal name; requests there are not allowed")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise Refused(f"could not resolve {host}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    # Every address must pass: the connection (or a retry) could go to any of them.
    return [_checked(ip_address(a), f"{host} resolves to", trusted) for a in addresses]


def _checked(ip: IPv4Address | IPv6Address, subject: str, trusted: bool) -> str:
    kind = None if trusted else _non_public(ip)
    if kind is not None:
        # The address itself stays out of the message: it would map the internal network for a caller.
        raise Refused(f"{subject} a {kind} address; requests there are not allowed")
    return str(ip)
