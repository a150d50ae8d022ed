"""Prefect Secret blocks as the secret vault of tasks/secrets.py (`caption.gemini.secret_block`)."""

from __future__ import annotations

from prefect.blocks.system import Secret


class PrefectSecrets:
    """Named secrets from Prefect's Secret blocks."""

    def load(self, name: str) -> str:
        return Secret.load(name).get()
