"""RegistryClient after close: a sentence, not httpx's bare RuntimeError."""

from __future__ import annotations

import pytest

from gc_core.errors import RegistryError
from gc_core.registry_api import RegistryClient


def test_a_closed_client_says_it_was_closed() -> None:
    # An Executor's ledger follow-up thread outlived the Client it was given, and died on
    # "RuntimeError: Cannot send a request, as the client has been closed."
    client = RegistryClient("http://127.0.0.1:9")
    client.close()

    assert client.closed
    with pytest.raises(RegistryError, match="this client was closed"):
        client.get_tasks(["a-task"])
