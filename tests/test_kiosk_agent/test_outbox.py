"""The durable outbox: seqs that never repeat, release on confirmation, bounds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk_agent.outbox import Outbox


def item(n: int) -> dict[str, object]:
    return {"metric": "heart_rate", "value": 60 + n}


def test_seqs_are_contiguous_and_survive_reopening(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert box.add_readings([item(0), item(1)]) == [0, 1]
    assert box.add_event({"state": "scanning"}) == 2
    box.close()

    reopened = Outbox(tmp_path / "o.db")
    assert reopened.add_readings([item(2)]) == [3]
    pending = reopened.due(resend_after_seconds=60)
    assert [(p.first_seq, p.last_seq, p.leaf) for p in pending] == [
        (0, 1, "readings"),
        (2, 2, "events"),
        (3, 3, "readings"),
    ]
    assert pending[0].body[1] == {"metric": "heart_rate", "value": 61, "seq": 1}


def test_an_append_survives_a_process_dying_without_cleanup(tmp_path: Path) -> None:
    # os._exit: no close, no flush, like a kill right after the append returns.
    code = (
        "import os, sys; from pathlib import Path; from kiosk_agent.outbox import Outbox;"
        "Outbox(Path(sys.argv[1])).add_readings([{'value': 1}]); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "o.db")], check=True)
    box = Outbox(tmp_path / "o.db")
    assert [p.first_seq for p in box.due(60)] == [0]
    assert box.next_seq == 1


def test_only_confirmation_releases(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    for n in range(5):
        box.add_readings([item(n), item(n)])  # seqs 2n, 2n+1
    box.mark_sent([0, 2, 4, 6, 8])
    assert box.depth() == 5
    assert box.due(resend_after_seconds=60) == []
    assert box.release(4) == 2  # rows 0..1 and 2..3; row 4..5 only half confirmed
    assert box.floor() == 4
    assert box.depth() == 3


def test_unconfirmed_messages_come_due_again(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.add_readings([item(0)])
    box.mark_sent([0])
    assert box.due(resend_after_seconds=60) == []
    time.sleep(0.05)
    (again,) = box.due(resend_after_seconds=0.01)
    assert (again.first_seq, again.sends) == (0, 1)


def test_replay_all_resends_everything_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    for n in range(3):
        box.add_readings([item(n)])
    box.mark_sent([0, 1, 2])
    box.replay_all()
    assert [p.first_seq for p in box.due(60)] == [0, 1, 2]


def test_size_bound_drops_oldest_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path / "o.db", max_messages=3)
    for n in range(5):
        box.add_readings([item(n), item(n)])
    assert box.depth() == 3
    assert box.floor() == 4
    assert box.dropped == 4
    assert "dropped 2 oldest seqs 0..1" in caplog.text


def test_age_bound_drops_stale_messages(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_age_seconds=0.05)
    box.add_readings([item(0)])
    time.sleep(0.1)
    box.add_readings([item(1)])
    assert [p.first_seq for p in box.due(60)] == [1]
    assert box.dropped == 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=20), st.data())
def test_release_never_drops_unconfirmed_seqs(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], data: st.DataObject
) -> None:
    box = Outbox(tmp_path_factory.mktemp("ob") / "o.db")
    seqs = [s for n in sizes for s in box.add_readings([item(0)] * n)]
    through = data.draw(st.integers(-1, seqs[-1]))
    box.release(through)
    held = {s for p in box.due(60) for s in range(p.first_seq, p.last_seq + 1)}
    assert {s for s in seqs if s > through} <= held
    assert all(p.last_seq > through for p in box.due(60))
