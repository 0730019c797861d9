"""Payload schemas, version 1, shared by the kiosk agent and the bridge.

Every payload is a JSON object with ``v`` (schema version) and ``kind``. Everything a
kiosk must deliver reliably, readings and scan events, carries a ``seq`` drawn from
one per-kiosk counter that survives restarts; ``(kiosk_id, seq)`` identifies it end to
end and the store deduplicates on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vitals_contract.metrics import METRICS, Metric
from vitals_contract.topics import KIOSK_ID_PATTERN, Leaf

SCHEMA_VERSION: Literal[1] = 1
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_READINGS_PER_MESSAGE = 500
MAX_SEQ = 2**63 - 1


def _to_utc(value: datetime) -> datetime:
    # Most timestamps arrive in UTC already: skip building a copy of those.
    return value.astimezone(UTC) if value.utcoffset() else value


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
KioskId = Annotated[str, Field(pattern=KIOSK_ID_PATTERN)]
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]
ScanId = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
]
Quality = Annotated[float, Field(ge=0.0, le=1.0)]


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        """Serialise to compact UTF-8 JSON."""
        return self.model_dump_json(exclude_none=True).encode()


class Reading(BaseModel):
    """One vital-sign value with its quality, as measured at ``measured_at``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: Seq
    scan_id: ScanId | None = None
    metric: Metric
    value: float
    unit: str
    quality: Quality
    measured_at: UtcDatetime
    final: bool = Field(
        default=False, description="True for the end-of-scan summary value."
    )

    @model_validator(mode="after")
    def _check_against_metric(self) -> Reading:
        info = METRICS[self.metric]
        if self.unit != info.unit:
            raise ValueError(
                f"unit does not match {self.metric.value} (expected {info.unit!r})"
            )
        if not math.isfinite(self.value):
            raise ValueError("value must be finite")
        if not info.min_value <= self.value <= info.max_value:
            raise ValueError(
                f"{self.metric.value} value outside "
                f"[{info.min_value}, {info.max_value}] {info.unit}"
            )
        return self

    @property
    def estimate(self) -> bool:
        """Whether this metric is only an estimate (SpO2, stress)."""
        return METRICS[self.metric].estimate


class ReadingsMessage(Message):
    """A batch of readings from one kiosk, published on ``.../readings``."""

    kind: Literal["readings"] = "readings"
    kiosk_id: KioskId
    sent_at: UtcDatetime
    floor: Seq = Field(
        default=0,
        description=(
            "Lowest seq the kiosk still holds. Every lower seq was confirmed or "
            "deliberately dropped by the kiosk's outbox policy, so the bridge need "
            "not wait for it."
        ),
    )
    readings: list[Reading] = Field(min_length=1, max_length=MAX_READINGS_PER_MESSAGE)

    @field_validator("readings")
    @classmethod
    def _seqs_increase(cls, readings: list[Reading]) -> list[Reading]:
        last = -1
        for r in readings:  # a plain loop: this runs for every message ingested
            if r.seq <= last:
                raise ValueError("reading seqs must strictly increase within a message")
            last = r.seq
        return readings


class ScanState(StrEnum):
    """States of a kiosk scan."""

    IDLE = "idle"
    FACE_PRESENT = "face_present"
    SCANNING = "scanning"
    COMPLETE = "complete"
    ABORTED = "aborted"


class ScanEvent(Message):
    """A scan state change, published on ``.../events`` through the outbox."""

    kind: Literal["scan_event"] = "scan_event"
    kiosk_id: KioskId
    seq: Seq
    floor: Seq = 0
    scan_id: ScanId
    state: ScanState
    at: UtcDatetime
    reason: str | None = Field(default=None, max_length=200)
    patient_ref: str | None = Field(
        default=None,
        max_length=128,
        description="Patient identifier bound by a start_scan command. Never logged.",
    )


class KioskState(StrEnum):
    """Connection state a kiosk announces (retained)."""

    ONLINE = "online"
    OFFLINE = "offline"


class KioskStatus(Message):
    """Retained kiosk status; the offline form is the MQTT Last Will."""

    kind: Literal["status"] = "status"
    kiosk_id: KioskId
    state: KioskState
    at: UtcDatetime
    agent_version: str | None = Field(default=None, max_length=32)
    capabilities: list[str] = Field(default_factory=list, max_length=32)


class CameraState(StrEnum):
    """Camera health reported in heartbeats."""

    OK = "ok"
    MISSING = "missing"
    ERROR = "error"


class Heartbeat(Message):
    """Periodic health report of a kiosk."""

    kind: Literal["heartbeat"] = "heartbeat"
    kiosk_id: KioskId
    at: UtcDatetime
    camera: CameraState
    fps: float = Field(ge=0)
    queue_depth: int = Field(ge=0)
    cpu_percent: float = Field(ge=0)


class CommandAction(StrEnum):
    """Commands a kiosk accepts."""

    START_SCAN = "start_scan"
    CANCEL_SCAN = "cancel_scan"
    PING = "ping"
    SET = "set"


class Command(Message):
    """An instruction to one kiosk, published on its ``.../command`` topic."""

    kind: Literal["command"] = "command"
    command_id: Annotated[str, Field(min_length=1, max_length=64)]
    action: CommandAction
    issued_at: UtcDatetime
    patient_ref: str | None = Field(default=None, max_length=128)
    args: dict[str, str | int | float | bool] = Field(default_factory=dict)


class CommandResult(Message):
    """A kiosk's reply to a command, on ``.../command/result``."""

    kind: Literal["command_result"] = "command_result"
    kiosk_id: KioskId
    command_id: str = Field(max_length=64)
    ok: bool
    at: UtcDatetime
    error: str | None = Field(default=None, max_length=200)


class CommitConfirmation(Message):
    """The bridge's word that every seq up to ``through`` is committed."""

    kind: Literal["confirm"] = "confirm"
    kiosk_id: KioskId
    through: int = Field(ge=-1, le=MAX_SEQ)
    at: UtcDatetime


class AlertSeverity(StrEnum):
    """Alert severities, lowest first."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class AlertState(StrEnum):
    """Alert lifecycle states."""

    RAISED = "raised"
    CLEARED = "cleared"
    ACKNOWLEDGED = "acknowledged"


class AlertMessage(Message):
    """An alert lifecycle change, published by the bridge."""

    kind: Literal["alert"] = "alert"
    alert_id: int
    kiosk_id: KioskId
    metric: Metric
    severity: AlertSeverity
    state: AlertState
    value: float
    at: UtcDatetime
    scan_id: ScanId | None = None
    estimate: bool = False
    message: str = Field(max_length=200)


class ContractError(ValueError):
    """A payload that does not satisfy the contract."""


_INBOUND: dict[Leaf, type[Message]] = {
    Leaf.READINGS: ReadingsMessage,
    Leaf.EVENTS: ScanEvent,
    Leaf.STATUS: KioskStatus,
    Leaf.HEARTBEAT: Heartbeat,
    Leaf.COMMAND: Command,
    Leaf.COMMAND_RESULT: CommandResult,
    Leaf.CONFIRM: CommitConfirmation,
}


def model_for(leaf: Leaf) -> type[Message]:
    """Return the payload model of a kiosk topic leaf."""
    return _INBOUND[leaf]


def parse_payload(
    leaf: Leaf, payload: bytes | bytearray, kiosk_id: str | None = None
) -> Any:
    """Validate ``payload`` for ``leaf``; raise :class:`ContractError` with the reason.

    When ``kiosk_id`` is given (from the topic), a payload naming another kiosk is
    refused, so a kiosk cannot write into another's records through its own topic.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError(
            f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        )
    try:
        message = _INBOUND[leaf].model_validate_json(payload)
    except ValidationError as exc:
        raise ContractError(_summarise(exc)) from exc
    claimed = getattr(message, "kiosk_id", None)
    if kiosk_id is not None and claimed is not None and claimed != kiosk_id:
        raise ContractError("kiosk_id in payload does not match the topic")
    return message


def _summarise(exc: ValidationError) -> str:
    """Condense a validation error to one line without echoing input values."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


class _ReadingsEnvelope(Message):
    """A readings message whose items are not yet validated."""

    kind: Literal["readings"] = "readings"
    kiosk_id: KioskId
    sent_at: UtcDatetime
    floor: Seq = 0
    readings: list[Any] = Field(min_length=1, max_length=MAX_READINGS_PER_MESSAGE)


@dataclass(frozen=True, slots=True)
class RejectedReading:
    """One item of a readings message that failed validation."""

    seq: int | None
    reason: str
    raw: Any


@dataclass(frozen=True, slots=True)
class SplitReadings:
    """A readings message taken apart item by item."""

    kiosk_id: str
    floor: int
    good: list[Reading]
    bad: list[RejectedReading]


def split_readings(payload: bytes | bytearray, kiosk_id: str) -> SplitReadings:
    """Validate a readings message item by item, so one bad reading spares the rest.

    Raises :class:`ContractError` when the envelope itself is unusable.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError(
            f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        )
    # The common case first: a wholly valid message, validated in one pass.
    try:
        message = ReadingsMessage.model_validate_json(payload)
    except ValidationError:
        pass  # find out item by item what is wrong, and keep what is right
    else:
        if message.kiosk_id != kiosk_id:
            raise ContractError("kiosk_id in payload does not match the topic")
        return SplitReadings(kiosk_id, message.floor, list(message.readings), [])
    try:
        envelope = _ReadingsEnvelope.model_validate_json(payload)
    except ValidationError as exc:
        raise ContractError(_summarise(exc)) from exc
    if envelope.kiosk_id != kiosk_id:
        raise ContractError("kiosk_id in payload does not match the topic")
    good: list[Reading] = []
    bad: list[RejectedReading] = []
    last_seq = -1
    for item in envelope.readings:
        raw_seq = item.get("seq") if isinstance(item, dict) else None
        seq = raw_seq if isinstance(raw_seq, int) and 0 <= raw_seq <= MAX_SEQ else None
        try:
            reading = Reading.model_validate(item)
        except ValidationError as exc:
            bad.append(RejectedReading(seq, _summarise(exc), item))
            continue
        if reading.seq <= last_seq:
            bad.append(RejectedReading(None, "seq does not increase", item))
            continue
        last_seq = reading.seq
        good.append(reading)
    return SplitReadings(kiosk_id, envelope.floor, good, bad)
