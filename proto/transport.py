"""Transport rules both ends share: TLS by default, plaintext only on loopback."""

from __future__ import annotations

import ipaddress

from proto.errors import GpuattestError

LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})

# Trailing metadata of a verifier rejection (see docs/protocol.md): why, where the agent's
# chain stands, and, for "not now" refusals, how long to wait before retrying.
REASON_KEY = "gpuattest-reason"
ACKED_SEQUENCE_KEY = "gpuattest-acked-sequence"
RETRY_AFTER_KEY = "gpuattest-retry-after-ms"


class TransportError(GpuattestError):
    """An address or TLS setting is not acceptable."""


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` into host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TransportError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for names and addresses that never leave this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext_allowed(address: str) -> None:
    """Raise unless ``address`` is on loopback: evidence never crosses a network unencrypted."""
    host, _ = split_address(address)
    if not is_loopback(host):
        raise TransportError(
            f"plaintext gRPC is only allowed on loopback, not {host!r}; configure TLS"
        )
