"""The htex engine's view of its blocks, between two of the provider's status polls."""

from __future__ import annotations

from gc_agent.engines.htex import block_states


def test_a_pending_block_whose_manager_connected_is_running() -> None:
    # Parsl still calls block 0 pending (its provider was last asked before the job began),
    # but a manager of block 0 has connected: its workers run tasks, so it is running.
    polled = {"0": "pending", "1": "pending", "2": "completed", "3": "running"}

    assert block_states(polled, with_managers={"0", "2"}) == {
        "0": "running", "1": "pending", "2": "completed", "3": "running"}


def test_without_managers_the_provider_is_believed() -> None:
    polled = {"0": "pending", "1": "failed"}

    assert block_states(polled, with_managers=set()) == polled
