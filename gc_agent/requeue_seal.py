"""Seals on the tasks an agent puts back on its own queue alone (a batch's tasks, split).

The broker stamps a task put back with the agent's account, not its submitter's, so the agent
must take that task's claim of who sent it on trust. A seal (HMAC-SHA256 under a key kept in
the endpoint's folder, never sent anywhere) narrows that trust to the tasks this agent put
back itself: the agent's broker login alone (a token read off an unencrypted connection, say)
does not let its holder inject tasks that claim to come from someone else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from pathlib import Path

from gc_core.protocol import Envelope

__all__ = ["SEAL_HEADER", "RequeueSeal"]

SEAL_HEADER = "gc-requeue-seal"
KEY_BYTES = 32
#: Our own headers carry what a task says; the broker adds x-* ones (x-death,
#: x-delivery-count) on its way, which a seal must not depend on.
SEALED_HEADER_PREFIX = "gc-"


class RequeueSeal:
    """Seals and checks tasks put back alone, under the key in ``key_file`` (made, owner-only,
    the first time one is needed)."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def seal(self, envelope: Envelope) -> Envelope:
        """``envelope`` with its seal."""
        key = self._load(create=True)
        assert key is not None
        return envelope._replace(headers={**envelope.headers, SEAL_HEADER: _mac(key, envelope)})

    def sealed_by_us(self, envelope: Envelope) -> bool:
        """Whether ``envelope`` carries a seal this agent made (no key yet: it made none)."""
        given = _plain(envelope.headers.get(SEAL_HEADER))
        key = self._load(create=False)
        return (isinstance(given, str) and key is not None
                and hmac.compare_digest(given, _mac(key, envelope)))

    def _load(self, *, create: bool) -> bytes | None:
        with self._lock:
            if self._key is None:
                self._key = _read_key(self.key_file) or (_new_key(self.key_file) if create else None)
            return self._key


def _mac(key: bytes, envelope: Envelope) -> str:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    headers = {name: _plain(value) for name, value in envelope.headers.items()
               if name.startswith(SEALED_HEADER_PREFIX) and name != SEAL_HEADER}
    for part in (envelope.message_id.encode(), envelope.correlation_id.encode(),
                 envelope.content_type.encode(),
                 json.dumps(headers, sort_keys=True, default=str).encode(), envelope.body):
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.hexdigest()


def _plain(value: object) -> object:
    """A header value as our publish wrote it (the broker hands text back as bytes or str)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _read_key(path: Path) -> bytes | None:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    return key if len(key) == KEY_BYTES else None


def _new_key(path: Path) -> bytes:
    """A new key in ``path``, readable by this account alone; if another agent process made
    one meanwhile, that one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = os.urandom(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        existing = _read_key(path)
        if existing is None:
            raise
        return existing
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key
