"""Uploads for clients that cannot hold an MQTT connection: scans and batches.

Both are idempotent on ``(kiosk_id, seq)``, like MQTT ingest: sending the same
readings again stores nothing new and says so per item. A batch with bad items
stores the good ones and reports each bad one with its reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.auth import INGEST, Principal
from api.deps import BridgeDep
from api.security import auditor, require
from bridge.store import Batch
from vitals_contract import Reading, ScanEvent, ScanState, is_valid_kiosk_id
from vitals_contract.messages import KioskId, ScanId, Seq, UtcDatetime

router = APIRouter(tags=["uploads"])

MAX_BATCH_ITEMS = 1000


class ItemResult(BaseModel):
    """What happened to one uploaded item."""

    index: int
    kiosk_id: str | None
    seq: int | None
    status: Literal["stored", "duplicate", "invalid"]
    error: str | None = None


class UploadResult(BaseModel):
    """Per-item outcome of an upload."""

    stored: int
    duplicates: int
    invalid: int
    items: list[ItemResult]


class ScanUpload(BaseModel):
    """A completed scan: its summary readings, optionally bound to a patient."""

    model_config = ConfigDict(extra="forbid")

    kiosk_id: KioskId
    seq: Seq = Field(description="The scan record's own seq, from the kiosk's counter.")
    scan_id: ScanId
    completed_at: UtcDatetime
    patient_ref: str | None = Field(default=None, max_length=128)
    readings: list[Reading] = Field(min_length=1, max_length=100)


@router.post("/api/v1/readings/batch")
async def upload_batch(
    request: Request,
    bridge: BridgeDep,
    principal: Annotated[Principal, Depends(require(INGEST))],
    items: Annotated[list[Any], Field(max_length=MAX_BATCH_ITEMS)],
) -> UploadResult:
    """Store a JSON array of readings, each with its ``kiosk_id`` and ``seq``."""
    if len(items) > MAX_BATCH_ITEMS:
        raise HTTPException(422, f"at most {MAX_BATCH_ITEMS} items per batch")
    batch = Batch()
    results: list[ItemResult] = []
    keys: list[tuple[int, str, int]] = []
    for index, raw in enumerate(items):
        kiosk_id, seq = _identity(raw)
        try:
            reading = Reading.model_validate(
                {k: v for k, v in raw.items() if k != "kiosk_id"}
            )
            if kiosk_id is None or not is_valid_kiosk_id(kiosk_id):
                raise ValueError("kiosk_id missing or invalid")
        except (ValidationError, ValueError, AttributeError) as exc:
            results.append(ItemResult(index=index, kiosk_id=kiosk_id, seq=seq,
                                      status="invalid", error=_reason(exc)))  # fmt: skip
            continue
        batch.readings.append((kiosk_id, reading))
        keys.append((index, kiosk_id, reading.seq))
    new = await _commit(bridge, batch)
    for index, kiosk_id, seq in keys:
        status: Literal["stored", "duplicate"] = (
            "stored" if (kiosk_id, seq) in new else "duplicate"
        )
        results.append(
            ItemResult(index=index, kiosk_id=kiosk_id, seq=seq, status=status)
        )
    results.sort(key=lambda r: r.index)
    await auditor(request).arecord(principal.subject, "upload", f"batch:{len(items)}")
    return _summary(results)


@router.post("/api/v1/scans")
async def upload_scan(
    scan: ScanUpload,
    request: Request,
    bridge: BridgeDep,
    principal: Annotated[Principal, Depends(require(INGEST))],
) -> UploadResult:
    """Store one completed scan and its summary readings."""
    event = ScanEvent(
        kiosk_id=scan.kiosk_id,
        seq=scan.seq,
        scan_id=scan.scan_id,
        state=ScanState.COMPLETE,
        at=scan.completed_at,
        patient_ref=scan.patient_ref,
    )
    readings = [r.model_copy(update={"scan_id": scan.scan_id, "final": True})
                for r in scan.readings]  # fmt: skip
    batch = Batch(readings=[(scan.kiosk_id, r) for r in readings], events=[event])
    new = await _commit(bridge, batch)
    results = [
        ItemResult(
            index=i,
            kiosk_id=scan.kiosk_id,
            seq=r.seq,
            status="stored" if (scan.kiosk_id, r.seq) in new else "duplicate",
        )
        for i, r in enumerate(readings)
    ]
    await auditor(request).arecord(principal.subject, "upload", f"scan:{scan.scan_id}")
    return _summary(results)


async def _commit(bridge: Any, batch: Batch) -> set[tuple[str, int]]:
    if not batch.readings and not batch.events:
        return set()
    result = await bridge.ingest.commit_from_http(batch)
    return {(r.kiosk_id, r.seq) for r in result.new_readings}


def _identity(raw: Any) -> tuple[str | None, int | None]:
    if not isinstance(raw, dict):
        return None, None
    kiosk_id, seq = raw.get("kiosk_id"), raw.get("seq")
    return (
        kiosk_id if isinstance(kiosk_id, str) else None,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "item"
        return f"{where}: {first['msg']}"[:200]
    return str(exc)[:200] if not isinstance(exc, AttributeError) else "not an object"


def _summary(results: list[ItemResult]) -> UploadResult:
    return UploadResult(
        stored=sum(r.status == "stored" for r in results),
        duplicates=sum(r.status == "duplicate" for r in results),
        invalid=sum(r.status == "invalid" for r in results),
        items=results,
    )
