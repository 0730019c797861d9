"""The contiguous high-water mark that releases kiosk outboxes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge.store.progress import Progress


def contiguous_through(seqs: set[int], floor: int = 0) -> int:
    through = floor - 1
    while through + 1 in seqs:
        through += 1
    return through


@given(st.lists(st.integers(0, 60), max_size=80), st.randoms())
def test_any_arrival_order_gives_the_same_mark(seqs: list[int], rnd: object) -> None:
    shuffled = list(seqs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    progress = Progress()
    for chunk_start in range(0, len(shuffled), 7):
        progress = progress.advanced(shuffled[chunk_start : chunk_start + 7])
    assert progress.through == contiguous_through(set(seqs))
    assert progress.above == {s for s in seqs if s > progress.through}


@given(st.sets(st.integers(0, 50)), st.integers(0, 60))
def test_floor_settles_seqs_the_kiosk_dropped(seqs: set[int], floor: int) -> None:
    progress = Progress().advanced(seqs, floor)
    expected = contiguous_through(seqs | set(range(floor)))
    assert progress.through == expected


def test_advancing_does_not_mutate_the_original() -> None:
    start = Progress(3, {5})
    after = start.advanced([4])
    assert (start.through, start.above) == (3, {5})
    assert (after.through, after.above) == (5, set())


def test_redelivered_seqs_below_the_mark_change_nothing() -> None:
    progress = Progress(10, {12})
    assert progress.advanced([3, 7, 10]) == Progress(10, {12})
