"""Free TCP ports on an interface (for components that must know their port before binding)."""

from __future__ import annotations

import random
import socket

# Ports below the kernel's ephemeral range and above Ray's worker ports (10002-19999).
_RESERVED_LOW = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_outside_ephemeral_range(host: str = "127.0.0.1") -> int:
    """A free port that the OS will not hand out meanwhile, for a server that binds it only
    much later (vLLM's NIXL side channel binds tens of seconds after the worker picked it).
    A port from `free_port` is in the kernel's ephemeral range: any outgoing connection or
    `bind(0)` on the host may take it in between (seen: 'Address already in use')."""
    low = ephemeral_port_low()
    if low - 1 <= _RESERVED_LOW:
        return free_port(host)
    candidates = list(range(_RESERVED_LOW, low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)


def ephemeral_port_low() -> int:
    """The lowest port of the kernel's ephemeral range (0 where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
