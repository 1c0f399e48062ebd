"""Where the API may send webhooks: an address policy, and an httpx transport that connects only
to addresses the policy allows.

A tenant names the URL, so without a policy genq would POST into its own network (loopback, the
cloud metadata service at 169.254.169.254, Redis, Postgres). By default only public addresses are
allowed; an operator names extra networks (GENQ_WEBHOOK_ALLOW_NETWORKS) for in-cluster receivers.

Hosts are read the way the connection reads them: every host goes through `getaddrinfo`, which
also turns `2130706433`, `127.1` and `0177.0.0.1` into 127.0.0.1. At delivery the host is resolved
once, every address is checked, and the socket is opened to a checked address, so a name that
changes its answer between the check and the connect (DNS rebinding) gains nothing. TLS and the
Host header still use the URL's hostname (httpcore does the handshake with the origin's host).
No library of this kind fitted: advocate wraps requests, safehttpx is an async GET only.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

import httpcore
import httpx

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

NAT64 = IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address a gateway reaches


class AddressNotAllowed(Exception):
    """A webhook host that is, or resolves to, an address the policy refuses."""


def _public(ip: IPAddress) -> bool:
    """Globally routable unicast: not loopback, private, shared (100.64/10), link-local,
    multicast, reserved, documentation or unspecified."""
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_unspecified or ip.is_private)


def _forms(ip: IPAddress) -> list[IPAddress]:
    """The addresses a packet to `ip` can end up at: an IPv4-mapped IPv6 address is its IPv4
    address; 6to4 and NAT64 addresses also carry the IPv4 address a gateway forwards to."""
    if isinstance(ip, IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    forms: list[IPAddress] = [ip]
    if ip.sixtofour is not None:
        forms.append(ip.sixtofour)
    if ip in NAT64:
        forms.append(IPv4Address(int(ip) & 0xFFFFFFFF))
    return forms


def resolve(host: str, port: int | None = None) -> list[IPAddress]:
    """Every address `host` resolves to (a literal in any form the resolver accepts, or a name),
    in the resolver's order; raises socket.gaierror when it resolves to nothing."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ip_address(info[4][0]) for info in infos))


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses webhooks may reach: public ones, plus those in `allow`. A `remembering()`
    copy looks each host up once at submit (a batch's lines often share one receiver)."""

    allow: tuple[IPNetwork, ...] = ()
    _verdicts: dict[str, bool] | None = field(default=None, compare=False, repr=False)

    def remembering(self) -> AddressPolicy:
        return replace(self, _verdicts={})

    def allows(self, ip: IPAddress) -> bool:
        return all(_public(f) or any(f in net for net in self.allow) for f in _forms(ip))

    def checked(self, host: str, port: int | None = None) -> list[IPAddress]:
        """`host`'s addresses, every one of them allowed; AddressNotAllowed if any is not."""
        addresses = resolve(host, port)
        if not all(self.allows(ip) for ip in addresses):
            raise AddressNotAllowed(f"{host!r} is not an allowed webhook address")
        return addresses

    def check_host(self, host: str) -> None:
        """The check at submit: refuse a host that resolves to a refused address. A name that does
        not resolve now is let through (delivery checks again, on every attempt)."""
        verdicts = {} if self._verdicts is None else self._verdicts
        if host not in verdicts:
            try:
                self.checked(host)
                verdicts[host] = True
            except socket.gaierror:
                verdicts[host] = True
            except AddressNotAllowed:
                verdicts[host] = False
        if not verdicts[host]:
            raise AddressNotAllowed(f"{host!r} is not an allowed webhook address")


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's own sync backend, but each TCP connection resolves the host once, checks every
    address against the policy and connects to the checked addresses in turn."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._sync = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        try:
            addresses = self.policy.checked(host, port)
        except OSError as exc:  # the name does not resolve
            raise httpcore.ConnectError(str(exc)) from exc
        last: httpcore.ConnectError | None = None
        for ip in addresses:
            try:
                return self._sync.connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:  # refused or unreachable: the next address may answer
                last = exc
        assert last is not None  # getaddrinfo answers at least one address or raises
        raise last

    def sleep(self, seconds: float) -> None:
        self._sync.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport over a GuardedBackend. It never goes through a proxy (the proxy would be
    the address checked); CA settings (SSL_CERT_FILE, SSL_CERT_DIR) apply as in httpx."""

    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        # httpx builds its httpcore pool with no way to pass a network backend, so it is built again
        # (with httpx's default limits).
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=100, max_keepalive_connections=20,
            keepalive_expiry=5.0, network_backend=GuardedBackend(policy))
