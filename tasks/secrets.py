"""Secret values (API keys) known to this process, and redaction of any text that might hold one.

Whoever reads a secret registers it; lineage, artifacts and error messages pass through
`redact` before they are written anywhere.
"""

from __future__ import annotations

import threading

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
