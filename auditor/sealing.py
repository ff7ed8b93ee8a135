"""Texts on their way through Redis, sealed outside `full` privacy mode.

A task message carries the prompt (a worker needs it), its result and a streamed request's
events carry the completion: in Redis they sit in memory, in its append-only file on disk, and
in any dump of either. Outside `full` mode, where the database keeps no such text, they travel
sealed: encrypted and authenticated (Fernet: AES-128-CBC + HMAC-SHA256) with the deployment's
AUDITOR_PAYLOAD_KEY, which the API and the workers share and Redis never sees. In `full` mode, and
with no broker (the embedded default: nothing leaves the process), values pass as they are.

A sealed value is `{"sealed": "<token>"}`: still JSON, as Celery's serializer requires.
"""

from __future__ import annotations

import json
from typing import Any

from auditor.db.enums import PrivacyMode
from auditor.errors import ConfigError

SEALED = "sealed"


def new_key() -> str:
    """A fresh AUDITOR_PAYLOAD_KEY (`python -c "from auditor.sealing import new_key; print(new_key())"`)."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


class Sealer:
    def __init__(self, key: str):
        from cryptography.fernet import Fernet

        try:
            self._fernet = Fernet(key.encode())
        except ValueError as exc:
            raise ConfigError(
                f"AUDITOR_PAYLOAD_KEY is not a valid key ({exc}); make one with auditor.sealing.new_key()"
            ) from None

    def seal(self, value: Any) -> dict[str, str]:
        return {SEALED: self._fernet.encrypt(json.dumps(value).encode()).decode()}

    def open(self, value: Any) -> Any:
        """A sealed value's contents; anything else as it is (a message sent in `full` mode)."""
        if isinstance(value, dict) and value.keys() == {SEALED}:
            from cryptography.fernet import InvalidToken

            try:
                return json.loads(self._fernet.decrypt(value[SEALED].encode()))
            except InvalidToken:
                raise ConfigError(
                    "a sealed payload does not open with this AUDITOR_PAYLOAD_KEY: the API and the workers must share one"
                ) from None
        return value


class Open:
    """What `full` mode and the embedded default use: nothing is sealed."""

    def seal(self, value: Any) -> Any:
        return value

    def open(self, value: Any) -> Any:
        return value


def sealer(settings) -> Sealer | Open:
    """The deployment's sealer: sealing outside `full` mode when a broker carries the texts."""
    if settings.privacy_mode == PrivacyMode.FULL or not settings.broker_url:
        return Open()
    key = settings.payload_key.get_secret_value() if settings.payload_key else ""
    if not key:
        raise ConfigError(
            f"AUDITOR_PRIVACY_MODE={settings.privacy_mode} with a broker needs AUDITOR_PAYLOAD_KEY, shared by the API "
            "and the workers, so prompts and completions cross Redis sealed; make one with "
            '`python -c "from auditor.sealing import new_key; print(new_key())"`'
        )
    return Sealer(key)
