"""TLS-aware helpers for the security tests (the throwaway PKI is in tests/conftest.py)."""

from __future__ import annotations

from recsys import channels
from recsys.config import TLSSettings


async def wait_serving(
    address: str, service: str, tls: TLSSettings | None = None, timeout_s: float = 60.0
) -> None:
    """Polls ``Health/Check`` (over TLS when given) until SERVING."""
    await channels.wait_serving(address, service, tls=tls, timeout_s=timeout_s)
