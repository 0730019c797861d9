"""Alert rules: one alert per episode, hysteresis, quality floor, estimate caps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.alerts import AlertEvaluator, Band, ChangeKind, Rule, load_rules
from bridge.store import StoredReading
from vitals_contract import AlertSeverity, Metric

T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def hr(
    second: float, value: float, quality: float = 0.9, kiosk: str = "k1"
) -> StoredReading:
    at = T0 + timedelta(seconds=second)
    return StoredReading(
        id=int(second * 10),
        kiosk_id=kiosk,
        seq=int(second * 10),
        scan_id="s1",
        metric="heart_rate",
        value=value,
        unit="/min",
        quality=quality,
        final=False,
        measured_at=at,
        received_at=at,
    )


def evaluator() -> tuple[AlertEvaluator, list[tuple[ChangeKind, AlertSeverity]]]:
    ev = AlertEvaluator(load_rules())
    return ev, []


def feed(
    ev: AlertEvaluator, readings: list[StoredReading]
) -> list[tuple[ChangeKind, str]]:
    out = []
    for n, r in enumerate(readings):
        change = ev.observe(r)
        if change is not None:
            if change.kind is ChangeKind.RAISE:
                ev.bind(change, n + 1)
            out.append((change.kind, change.severity.value))
    return out


def test_default_rules_follow_news2_bands() -> None:
    rule = load_rules()[Metric.HEART_RATE]
    cases = {35: "high", 45: "low", 70: None, 100: "low", 120: "medium", 140: "high"}
    for value, severity in cases.items():
        assert rule.classify(value) == (
            AlertSeverity(severity) if severity else None
        ), value


def test_camera_spo2_never_reaches_top_severity() -> None:
    rule = load_rules()[Metric.SPO2]
    assert rule.classify(85) is AlertSeverity.MEDIUM
    assert rule.classify(97) is None


def test_raise_needs_the_minimum_duration() -> None:
    ev, _ = evaluator()
    brief = [hr(0, 150), hr(2, 150), hr(4, 70), hr(5, 70)]
    assert feed(ev, brief) == []
    held = [hr(10 + s, 150) for s in range(7)]
    assert feed(ev, held) == [(ChangeKind.RAISE, "high")]


def test_flapping_value_raises_once_per_episode() -> None:
    ev, _ = evaluator()
    # Above 130, then dancing around the edge inside the hysteresis band.
    readings = [hr(s, 135) for s in range(6)]
    readings += [hr(6 + s, 129 if s % 2 else 132) for s in range(30)]
    assert feed(ev, readings) == [(ChangeKind.RAISE, "high")]


def test_clear_needs_hysteresis_and_time_then_a_new_episode_can_start() -> None:
    ev, _ = evaluator()
    readings = [hr(s, 140) for s in range(6)]
    readings += [hr(6 + s, 70) for s in range(6)]
    readings += [hr(12 + s, 140) for s in range(6)]
    assert feed(ev, readings) == [
        (ChangeKind.RAISE, "high"),
        (ChangeKind.CLEAR, "high"),
        (ChangeKind.RAISE, "high"),
    ]


def test_rising_severity_escalates_the_same_episode() -> None:
    ev, _ = evaluator()
    readings = [hr(s, 115) for s in range(6)] + [hr(6 + s, 150) for s in range(3)]
    assert feed(ev, readings) == [
        (ChangeKind.RAISE, "medium"),
        (ChangeKind.ESCALATE, "high"),
    ]


def test_low_quality_readings_never_alarm() -> None:
    ev, _ = evaluator()
    assert feed(ev, [hr(s, 190, quality=0.2) for s in range(20)]) == []


def test_late_replayed_readings_do_not_rewind_an_episode() -> None:
    ev, _ = evaluator()
    readings = [hr(s, 140) for s in range(6)] + [hr(1, 70), hr(2, 70)]
    assert feed(ev, readings) == [(ChangeKind.RAISE, "high")]


def test_kiosks_have_separate_episodes() -> None:
    ev, _ = evaluator()
    readings = [hr(s, 140, kiosk=k) for s in range(6) for k in ("a", "b")]
    assert feed(ev, readings) == [
        (ChangeKind.RAISE, "high"),
        (ChangeKind.RAISE, "high"),
    ]


@given(st.lists(st.floats(20, 250), min_size=1, max_size=120))
def test_lifecycle_always_alternates(values: list[float]) -> None:
    ev, _ = evaluator()
    kinds = [k for k, _ in feed(ev, [hr(s, v) for s, v in enumerate(values)])]
    open_episode = False
    for kind in kinds:
        if kind is ChangeKind.RAISE:
            assert not open_episode
            open_episode = True
        else:
            assert open_episode
            open_episode = kind is not ChangeKind.CLEAR


def test_rules_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[heart_rate]\nbands = [{ severity = "high" }]\n')
    with pytest.raises(ValueError, match="needs `below`, `above`"):
        load_rules(path)
    path.write_text('[pulse]\nbands = [{ severity = "high", above = 1 }]\n')
    with pytest.raises(ValueError, match="pulse"):
        load_rules(path)


def test_band_margin_pulls_edges_inward() -> None:
    band = Band(severity=AlertSeverity.LOW, below=50, above=90)
    assert not band.fires(89)
    assert band.fires(89, margin=3)
    assert Rule(bands=[band], hysteresis=3).classify(52, margin=3) is AlertSeverity.LOW
