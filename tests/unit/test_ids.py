"""Random ids: UUID 4 text, never repeated, not even by a forked child."""

from __future__ import annotations

import os
import uuid

from gc_core.ids import POOL_IDS, random_id


def test_ids_are_uuid4_text_with_the_version_and_variant_bits_set() -> None:
    for text in (random_id() for _ in range(3 * POOL_IDS)):
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


def test_ids_do_not_repeat_across_many_pool_refills() -> None:
    ids = [random_id() for _ in range(50 * POOL_IDS)]
    assert len(set(ids)) == len(ids)


def test_a_forked_child_draws_ids_of_its_own_not_its_parents_pool() -> None:
    random_id()  # the pool now holds POOL_IDS - 1 ids the parent will hand out next
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, "".join(random_id() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_ids = pipe.read()
    os.waitpid(child, 0)
    parent_ids = "".join(random_id() for _ in range(8))
    assert len(child_ids) == len(parent_ids) == 8 * 36
    assert child_ids != parent_ids
