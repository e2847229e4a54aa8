"""Render raw sockaddr bytes the way strace users read them."""

from __future__ import annotations

import ipaddress
import struct

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16


def format_sockaddr(raw: bytes) -> str:
    """`inet:1.2.3.4:80`, `inet6:[::1]:80`, `unix:/path`, `unix:@abstract`, or `family=N`."""
    if len(raw) < 2:
        return "truncated"
    fam = struct.unpack_from("<H", raw)[0]
    if fam == AF_INET and len(raw) >= 8:
        port = struct.unpack_from(">H", raw, 2)[0]
        return f"inet:{ipaddress.IPv4Address(raw[4:8])}:{port}"
    if fam == AF_INET6 and len(raw) >= 24:
        port = struct.unpack_from(">H", raw, 2)[0]
        return f"inet6:[{ipaddress.IPv6Address(raw[8:24])}]:{port}"
    if fam == AF_UNIX:
        path = raw[2:]
        if not path:
            return "unix:"
        if path[0] == 0:
            return "unix:@" + path[1:].split(b"\0")[0].decode(errors="backslashreplace")
        return "unix:" + path.split(b"\0")[0].decode(errors="backslashreplace")
    if fam == AF_NETLINK:
        return "netlink"
    return f"family={fam}"
