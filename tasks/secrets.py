"""Secret values (API keys) known to this process, and redaction of any text that might hold one.

Whoever reads a secret registers it; lineage, artifacts and error messages pass through
`redact` before they are written anywhere.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Protocol

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class SecretVault(Protocol):
    """Named secrets kept by the orchestrator (flows/prefect_secrets.py: Prefect Secret blocks)."""

    def load(self, name: str) -> str: ...


_vault: SecretVault | None = None


@contextmanager
def attached_vault(vault: SecretVault) -> Iterator[None]:
    """Make `vault`'s named secrets loadable inside the block."""
    global _vault
    previous, _vault = _vault, vault
    try:
        yield
    finally:
        _vault = previous


def load_named_secret(name: str) -> str:
    """The value of the named secret in the attached vault; raises LookupError without one."""
    if _vault is None:
        raise LookupError("no secret store is attached (named secrets are read when the stage runs as a Prefect task, "
                          "as `tok1d run` and deployments do)")
    return _vault.load(name)
