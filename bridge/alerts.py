"""Threshold alerts: raise once per episode, clear with hysteresis, never on poor data.

The evaluator is pure: it sees stored readings (each once, in commit order) and says
what changed. Persisting, publishing and acknowledging happen around it.

Per ``(kiosk, metric)`` the lifecycle is::

    normal --(out of range for min_duration)--> raised --(severity up)--> raised
    raised --(back inside range minus hysteresis for clear_after)--> cleared

``acknowledged`` is set by a person and does not end the episode; only a clear does.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bridge.store import StoredReading
from vitals_contract import METRICS, AlertSeverity, Metric

log = logging.getLogger(__name__)

_SEVERITY_RANK = {AlertSeverity.LOW: 1, AlertSeverity.MEDIUM: 2, AlertSeverity.HIGH: 3}


def rank(severity: AlertSeverity | None) -> int:
    """Order severities; None (normal) ranks lowest."""
    return 0 if severity is None else _SEVERITY_RANK[severity]


class Band(BaseModel):
    """Fires when a value is below ``below`` or above ``above``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    severity: AlertSeverity
    below: float | None = None
    above: float | None = None

    @model_validator(mode="after")
    def _has_an_edge(self) -> Band:
        if self.below is None and self.above is None:
            raise ValueError("a band needs `below`, `above` or both")
        return self

    def fires(self, value: float, margin: float = 0.0) -> bool:
        """Tell whether ``value`` is outside, with the edges pulled in by ``margin``."""
        low = self.below is not None and value < self.below + margin
        high = self.above is not None and value > self.above - margin
        return low or high


class Rule(BaseModel):
    """The alert rule of one metric."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bands: list[Band] = Field(min_length=1)
    min_duration_seconds: float = Field(default=0.0, ge=0)
    hysteresis: float = Field(default=0.0, ge=0)
    clear_after_seconds: float = Field(default=0.0, ge=0)
    quality_floor: float = Field(default=0.5, ge=0, le=1)
    max_severity: AlertSeverity = AlertSeverity.HIGH

    def classify(self, value: float, margin: float = 0.0) -> AlertSeverity | None:
        """Return the highest firing severity (capped), or None when normal."""
        firing = [b.severity for b in self.bands if b.fires(value, margin)]
        if not firing:
            return None
        worst = max(firing, key=rank)
        return worst if rank(worst) <= rank(self.max_severity) else self.max_severity


def load_rules(path: Path | None = None) -> dict[Metric, Rule]:
    """Load rules from ``path``, or the packaged adult defaults."""
    if path is None:
        text = resources.files("bridge").joinpath("alert_rules.toml").read_text()
    else:
        text = path.read_text()
    raw: dict[str, Any] = tomllib.loads(text)
    rules = {Metric(name): Rule.model_validate(body) for name, body in raw.items()}
    log.info("loaded alert rules for %s", ", ".join(sorted(m.value for m in rules)))
    return rules


class ChangeKind(StrEnum):
    """What happened to an alert."""

    RAISE = "raise"
    ESCALATE = "escalate"
    CLEAR = "clear"


@dataclass(frozen=True, slots=True)
class AlertChange:
    """One alert lifecycle step decided by the evaluator."""

    kind: ChangeKind
    kiosk_id: str
    metric: Metric
    severity: AlertSeverity
    value: float
    at: datetime
    scan_id: str | None
    alert_id: int | None  # None for a raise until the store assigns one

    @property
    def estimate(self) -> bool:
        """Whether the alert rests on an estimated metric."""
        return METRICS[self.metric].estimate

    def describe(self) -> str:
        """Say what happened, without any patient detail."""
        info = METRICS[self.metric]
        unit = "" if info.unit == "1" else f" {info.unit}"
        est = " (camera estimate)" if info.estimate else ""
        if self.kind is ChangeKind.CLEAR:
            return f"{info.display} back in range at {self.value:g}{unit}{est}"
        return f"{info.display} {self.value:g}{unit} out of range{est}"


@dataclass(slots=True)
class _Track:
    last_at: datetime | None = None
    pending_since: datetime | None = None
    pending_severity: AlertSeverity | None = None
    alert_id: int | None = None
    severity: AlertSeverity | None = None
    clear_since: datetime | None = None


@dataclass
class AlertEvaluator:
    """Turns readings into alert changes; holds one small state per kiosk and metric."""

    rules: dict[Metric, Rule]
    _tracks: dict[tuple[str, str], _Track] = field(default_factory=dict)
    # Keyed by the plain metric name: a reading carries a str, and building the
    # enum for every reading costs more than the rest of a normal observation.
    _by_name: dict[str, tuple[Metric, Rule]] = field(init=False)

    def __post_init__(self) -> None:
        self._by_name = {m.value: (m, rule) for m, rule in self.rules.items()}

    def restore(self, kiosk_id: str, metric: str, alert_id: int, severity: str) -> None:
        """Resume an open episode found in the database at start-up."""
        track = self._tracks.setdefault((kiosk_id, metric), _Track())
        track.alert_id, track.severity = alert_id, AlertSeverity(severity)

    def bind(self, change: AlertChange, alert_id: int) -> None:
        """Record the id of the open alert a raise refers to.

        When another bridge instance raised it first, this is that alert's id, so the
        episode is shared and cleared once.
        """
        self._tracks[(change.kiosk_id, change.metric.value)].alert_id = alert_id

    def observe(self, r: StoredReading) -> AlertChange | None:
        """Evaluate one stored reading."""
        found = self._by_name.get(r.metric)
        if found is None:
            return None
        metric, rule = found
        if r.quality < rule.quality_floor:
            return None
        track = self._tracks.setdefault((r.kiosk_id, r.metric), _Track())
        if track.last_at is not None and r.measured_at < track.last_at:
            return None  # a late replay must not rewind the episode
        track.last_at = r.measured_at
        if track.severity is None:
            return self._while_normal(rule, track, r, metric)
        return self._while_raised(rule, track, r, metric)

    def _while_normal(
        self, rule: Rule, track: _Track, r: StoredReading, metric: Metric
    ) -> AlertChange | None:
        severity = rule.classify(r.value)
        if severity is None:
            track.pending_since = track.pending_severity = None
            return None
        if track.pending_since is None:
            track.pending_since = r.measured_at
        if rank(severity) > rank(track.pending_severity):
            track.pending_severity = severity
        held = (r.measured_at - track.pending_since).total_seconds()
        if held < rule.min_duration_seconds:
            return None
        assert track.pending_severity is not None
        track.severity = track.pending_severity
        track.pending_since = track.pending_severity = track.clear_since = None
        return self._change(ChangeKind.RAISE, track, r, metric)

    def _while_raised(
        self, rule: Rule, track: _Track, r: StoredReading, metric: Metric
    ) -> AlertChange | None:
        severity = rule.classify(r.value)
        if rank(severity) > rank(track.severity):
            track.severity = severity
            track.clear_since = None
            return self._change(ChangeKind.ESCALATE, track, r, metric)
        if rule.classify(r.value, margin=rule.hysteresis) is not None:
            track.clear_since = None
            return None
        if track.clear_since is None:
            track.clear_since = r.measured_at
        if (
            r.measured_at - track.clear_since
        ).total_seconds() < rule.clear_after_seconds:
            return None
        change = self._change(ChangeKind.CLEAR, track, r, metric)
        track.alert_id = track.severity = track.clear_since = None
        return change

    @staticmethod
    def _change(
        kind: ChangeKind, track: _Track, r: StoredReading, metric: Metric
    ) -> AlertChange:
        assert track.severity is not None
        return AlertChange(
            kind=kind,
            kiosk_id=r.kiosk_id,
            metric=metric,
            severity=track.severity,
            value=r.value,
            at=r.measured_at,
            scan_id=r.scan_id,
            alert_id=track.alert_id,
        )
