"""Where the server may connect on a client's behalf (remote images, webhooks): the shared address policy.

A URL's host must be in an allow list (the caller checks that); its name must resolve only to global
addresses, or to internal ones (private, loopback, link-local, ...) that are themselves listed, since a
listed name pointing inside the network is how a server is made to reach what it should not. The caller
then connects to the address that was checked, not to the name (a second lookup could answer otherwise),
naming the host in the Host header and in TLS (SNI and the certificate check): `pin` builds that request.
This module knows nothing of settings, HTTP clients or error statuses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import ParseResult, SplitResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}


class AddressRefused(Exception):
    """The host may not be connected to; the message names the host and why (no caller's label)."""


class HostUnresolved(AddressRefused):
    """The name has no address now: possibly a passing DNS failure, unlike a refused address."""


def ip_literal(host: str) -> IPAddress | None:
    """The address `host` spells (brackets already stripped, as `urlsplit().hostname` gives it), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_listed(host: str, allowed: Collection[str]) -> bool:
    """`host` (a name or an address) is in `allowed`; names compare case-blind, addresses by value (::1 = 0::1)."""
    literal = ip_literal(host)
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == host.lower() or (literal is not None and ip_literal(entry.strip("[]")) == literal):
            return True
    return False


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 hosts an IPv6 address reaches: IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002::/16), Teredo's server and
    client, and NAT64's translation prefixes (the last 32 bits)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if any(address in net for net in NAT64):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def _internal(address: IPAddress) -> bool:
    # an IPv6 address that carries an IPv4 one (::ffff:127.0.0.1, 64:ff9b::a00:1) reaches that host: judge it too
    return not address.is_global or any(not v4.is_global for v4 in _embedded_ipv4(address))


async def resolve_checked(host: str, port: int, allowed: Collection[str], setting: str) -> IPAddress:
    """The address to connect to for `host`. Raises `HostUnresolved` when the name does not resolve, and
    `AddressRefused` when any address it resolves to is internal and not itself in `allowed` (`setting` is the
    environment variable that lists them, named in the message)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise HostUnresolved(f"cannot resolve {host!r} ({exc})") from exc
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if _internal(address) and not is_listed(str(address), allowed):
            raise AddressRefused(f"{host!r} resolves to the internal address {address}; list that address "
                                 f"in {setting} to allow it")
    if not addresses:
        raise HostUnresolved(f"{host!r} resolves to no address")
    return addresses[0]


@dataclass(frozen=True)
class Pinned:
    """A request to `url`'s checked address that still names the host: send `url` with `headers` and
    `extensions` (httpx: the TLS server name, for SNI and the certificate check)."""

    url: str
    host_header: str
    server_name: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Host": self.host_header}

    @property
    def extensions(self) -> dict[str, Any]:
        return {"sni_hostname": self.server_name}


def pin(url: SplitResult | ParseResult, address: IPAddress) -> Pinned:
    """`url` (parsed, http or https) with `address` in place of its host; userinfo is dropped."""
    host = url.hostname or ""
    port = url.port or DEFAULT_PORTS[url.scheme]
    target = f"[{address}]" if address.version == 6 else str(address)
    named = f"[{host}]" if ":" in host else host  # an IPv6 literal is bracketed in a Host header too
    return Pinned(url=url._replace(netloc=f"{target}:{port}").geturl(),
                  host_header=named if url.port is None else f"{named}:{url.port}",
                  server_name=host)
