"""The seal an agent puts on a task it puts back on its own queue alone."""

from __future__ import annotations

import stat
from pathlib import Path

from gc_agent.requeue_seal import SEAL_HEADER, RequeueSeal
from gc_core.protocol import Envelope

TASK = Envelope("t-1", "g-1", "application/json",
                {"gc-user": "alice", "gc-function": "f-1", "gc-protocol": 1}, b'{"args": [1]}')


def test_a_sealed_task_checks_out_after_the_broker_adds_its_headers_and_turns_text_to_bytes(
        tmp_path: Path) -> None:
    seal = RequeueSeal(tmp_path / "ep" / "requeue.key")
    sealed = seal.seal(TASK)
    redelivered = sealed._replace(headers={
        **{name: value.encode() if isinstance(value, str) else value
           for name, value in sealed.headers.items()},
        "x-delivery-count": 2, "x-death": [{"reason": "rejected"}]})

    assert seal.sealed_by_us(redelivered)
    assert stat.S_IMODE((tmp_path / "ep" / "requeue.key").stat().st_mode) == 0o600


def test_a_restarted_agent_knows_its_seal_and_another_endpoints_key_does_not(tmp_path: Path) -> None:
    sealed = RequeueSeal(tmp_path / "a.key").seal(TASK)

    assert RequeueSeal(tmp_path / "a.key").sealed_by_us(sealed)
    assert not RequeueSeal(tmp_path / "b.key").sealed_by_us(sealed)  # (no key made by checking)
    assert not (tmp_path / "b.key").exists()


def test_changing_what_a_sealed_task_says_breaks_its_seal(tmp_path: Path) -> None:
    seal = RequeueSeal(tmp_path / "requeue.key")
    sealed = seal.seal(TASK)

    for changed in (sealed._replace(body=b'{"args": [2]}'),
                    sealed._replace(headers={**sealed.headers, "gc-user": "bob"}),
                    sealed._replace(headers={**sealed.headers, "gc-on-behalf-of": "bob"}),
                    sealed._replace(message_id="t-2"),
                    sealed._replace(content_type="application/x-cloudpickle"),
                    sealed._replace(headers={k: v for k, v in sealed.headers.items()
                                             if k != SEAL_HEADER}),
                    sealed._replace(headers={**sealed.headers, SEAL_HEADER: 7})):
        assert not seal.sealed_by_us(changed), changed
