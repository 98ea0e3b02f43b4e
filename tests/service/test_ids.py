"""Row ids made on the hot path: UUIDv7 layout, order, uniqueness, and no shared random bits after a fork."""

from __future__ import annotations

import os
import time
import uuid

from service import ids
from service.ids import uuid7


def test_uuid7_has_the_rfc_9562_layout_and_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert before <= value.int >> 80 <= after


def test_uuid7s_are_unique_and_time_ordered_across_many_random_pool_refills() -> None:
    made = [uuid7() for _ in range(ids._IDS_PER_FETCH * 20 + 7)]
    assert len(set(made)) == len(made)
    stamps = [u.int >> 80 for u in made]
    assert stamps == sorted(stamps)
    # The random part varies: no two ids share their 74 random bits.
    randoms = {u.int & ((1 << 74) - 1) for u in made}
    assert len(randoms) == len(made)


def test_a_forked_child_does_not_reuse_the_parents_random_bits() -> None:
    uuid7()  # the parent has a partly used pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id, then leave without running the test session's exit
        try:
            os.write(write, uuid7().bytes)
        finally:
            os._exit(0)
    os.close(write)
    child = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    os.waitpid(pid, 0)
    parent = uuid7()
    assert child.int & ((1 << 62) - 1) != parent.int & ((1 << 62) - 1)
