"""Names and addresses as an operator writes them: host names, key names, listen addresses,
IP addresses and networks, and the rules about them (each `*_problem` says what is wrong in
words, or None).

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Key names become directory names under certs/ and appear in logs and metrics labels.
KEY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# One DNS label, or a leading "*." wildcard label (RFC 6125 style: one whole left-most label).
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

# RFC 1035's limit on a whole name.
_MAX_HOST_NAME: Final = 253


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def normalize_host(name: str) -> str:
    """Lowercase and strip one trailing dot: how SNI names and hints are compared."""
    return name.lower().removesuffix(".")


def parse_address(text: str) -> ListenAddress:
    """ "127.0.0.1:8443", "[::1]:8443", "localhost:8443", ":8443" (every interface)."""
    host, sep, port_text = text.rpartition(":")
    # isdigit() alone admits non-ASCII digits ("²", Arabic-Indic) that int() rejects or reads.
    port_ok = port_text.isascii() and port_text.isdigit()
    if not sep or not port_ok or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8443 or [::1]:8443)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # raises ValueError with a clear message
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8443")
    return ListenAddress(host=host or "", port=int(port_text))


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_name_problem(text: str) -> str | None:
    """Why `text` is not a DNS name a certificate or SNI can carry (a leading "*." allowed);
    None when it is one."""
    # Checked before lowercasing could hide it: the Kelvin sign "\u212a" lowercases to "k".
    if not text.isascii():
        return f"{text!r}: write internationalized names in punycode (xn--)"
    name = normalize_host(text)
    labels = name.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
    if (
        len(name) > _MAX_HOST_NAME
        or len(labels) < (2 if wildcard else 1)
        or not all(_DNS_LABEL.fullmatch(x) for x in labels)
    ):
        return f"{text!r} is not a host name (a wildcard is allowed only as a leading '*.')"
    return None


def key_name_problem(name: str) -> str | None:
    """Why `name` cannot name a key (it becomes a folder under certs/); None when it can."""
    if KEY_NAME.fullmatch(name):
        return None
    return (
        f"{name!r}: key names are letters, digits, '.', '_' and '-' (at most 64), starting with"
        " a letter or digit"
    )


def admin_address_problem(address: ListenAddress, *, allow_non_loopback: bool) -> str | None:
    """Why the admin listener may not listen at `address`, or None: the config's address and
    `serve --admin` alike."""
    if allow_non_loopback or is_loopback_host(address.host):
        return None
    return (
        f"{address} is not a loopback address; the admin listener shows which clients get"
        " which key and takes the canary resume, so it listens on 127.0.0.1 or [::1] unless"
        " admin.allow_non_loopback = true (then firewall it)"
    )


def is_loopback_host(host: str) -> bool:
    """Whether a listen host ("127.0.0.1", "::1", "localhost") is loopback; "" (every
    interface) and other names are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
