"""SQL of FHIR Subscriptions: records, the numbered event log, binding tokens.

Every method is synchronous (run it in a thread) and raises
:class:`bridge.errors.StoreError` when the database fails.

Event numbering across processes: every API process sees every reading and may
log the same event. :meth:`SubscriptionStore.append` first takes the row lock of
each Subscription's counter (an ``UPDATE`` of ``events_since_start``, in id
order, so two processes never deadlock), then skips readings already logged for
that Subscription (unique ``(subscription_id, kiosk_id, seq)``), numbers the rest
from the counter and stores counter and events in the same transaction. A
number, once committed, is never reused; numbers become visible in order,
without holes, because the next one can only be taken after this commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    delete,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from api.fhir.subscriptions.resources import (
    Content,
    Event,
    Status,
    SubscriptionRecord,
    SubscriptionRequest,
)
from bridge.errors import StoreError
from bridge.store.db import StoredReading, reading_from_row, utc
from bridge.store.models import (
    FhirBindingToken,
    FhirSubscription,
    FhirSubscriptionEvent,
    ReadingRow,
    Scan,
)

log = logging.getLogger(__name__)

_S = FhirSubscription
_E = FhirSubscriptionEvent
_T = FhirBindingToken
LOOKUP_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Match:
    """A reading that matched one Subscription, waiting for its number."""

    subscription_id: str
    kiosk_id: str
    seq: int
    reading_id: int
    at: datetime


@dataclass(frozen=True, slots=True)
class Binding:
    """What a redeemed binding token grants."""

    subscription_id: str
    subject: str
    observations: bool
    access_jti: str
    access_expires_at: datetime


def token_hash(token: str) -> str:
    """Return the SHA-256 under which a binding token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def _record(row: Any) -> SubscriptionRecord:
    # A Core row of fhir_subscriptions (attribute access by column name).
    return SubscriptionRecord(
        id=row.id,
        owner=row.owner,
        status=Status(row.status),
        topic=row.topic,
        filters=list(json.loads(row.filters)),
        content=Content(row.content),
        heartbeat_seconds=row.heartbeat_seconds,
        reason=row.reason,
        end_at=None if row.end_at is None else utc(row.end_at),
        created_at=utc(row.created_at),
        events_since_start=int(row.events_since_start),
        error=row.error,
    )


class SubscriptionStore:
    """Subscriptions and their events in the bridge's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- records -----------------------------------------------------------

    def create(
        self,
        sub_id: str,
        owner: str,
        topic: str,
        request: SubscriptionRequest,
        now: datetime,
        max_per_owner: int,
    ) -> SubscriptionRecord | None:
        """Store a new Subscription; None when the owner already has the most."""
        row = FhirSubscription(
            id=sub_id,
            owner=owner,
            status=Status.REQUESTED.value,
            topic=topic,
            filters=json.dumps(request.filters),
            content=request.content.value,
            heartbeat_seconds=request.heartbeat_seconds,
            reason=request.reason,
            end_at=request.end_at,
            created_at=now,
            events_since_start=0,
            error=None,
        )
        values = {c.name: getattr(row, c.name) for c in _S.__table__.columns}
        count = select(_S.id).where(_S.owner == owner).limit(max_per_owner)
        try:
            with self.engine.begin() as conn:
                if len(conn.execute(count).all()) >= max_per_owner:
                    return None
                conn.execute(insert(_S).values(values))
        except SQLAlchemyError as exc:
            raise StoreError(
                f"subscription create failed: {type(exc).__name__}"
            ) from exc
        return _record(row)

    def get(self, sub_id: str) -> SubscriptionRecord | None:
        """Return one Subscription."""
        rows = self._select(select(_S).where(_S.id == sub_id))
        return rows[0] if rows else None

    def records(self, owner: str | None = None) -> list[SubscriptionRecord]:
        """Return every Subscription, or one owner's, oldest first."""
        query = select(_S).order_by(_S.created_at, _S.id)
        if owner is not None:
            query = query.where(_S.owner == owner)
        return self._select(query)

    def _select(self, query: Select[FhirSubscription]) -> list[SubscriptionRecord]:
        try:
            with self.engine.connect() as conn:
                return [_record(r) for r in conn.execute(query).all()]
        except SQLAlchemyError as exc:
            raise StoreError(f"subscription read failed: {type(exc).__name__}") from exc

    def delete(self, sub_id: str) -> None:
        """Delete a Subscription with its events and tokens."""
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(_E).where(_E.subscription_id == sub_id))
                conn.execute(delete(_T).where(_T.subscription_id == sub_id))
                conn.execute(delete(_S).where(_S.id == sub_id))
        except SQLAlchemyError as exc:
            raise StoreError(
                f"subscription delete failed: {type(exc).__name__}"
            ) from exc

    def set_status(self, sub_id: str, status: Status, error: str | None) -> None:
        """Record a status change (and its reason, for ``error``)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    update(_S)
                    .where(_S.id == sub_id)
                    .values(status=status.value, error=error)
                )
        except SQLAlchemyError as exc:
            raise StoreError(
                f"subscription update failed: {type(exc).__name__}"
            ) from exc

    # -- events ------------------------------------------------------------

    def patients_of(
        self, scans: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], str | None]:
        """Return the patient_ref of each ``(kiosk_id, scan_id)`` that has a scan."""
        keys = sorted(set(scans))
        found: dict[tuple[str, str], str | None] = {}
        try:
            with self.engine.connect() as conn:
                for start in range(0, len(keys), LOOKUP_CHUNK):
                    chunk = keys[start : start + LOOKUP_CHUNK]
                    query = select(Scan.kiosk_id, Scan.scan_id, Scan.patient_ref).where(
                        tuple_(Scan.kiosk_id, Scan.scan_id).in_(chunk)
                    )
                    for k, s, p in conn.execute(query):
                        found[(k, s)] = p
        except SQLAlchemyError as exc:
            raise StoreError(f"scan look-up failed: {type(exc).__name__}") from exc
        return found

    def append(
        self, matches: Sequence[Match], keep: int
    ) -> dict[str, list[tuple[Match, int]]]:
        """Number and log ``matches`` in one transaction (see the module docstring).

        Returns, per Subscription, every match with its number, whether this call
        or another process numbered it, in number order. Events more than ``keep``
        behind the newest are purged on the way.
        """
        by_sub: dict[str, list[Match]] = {}
        for m in matches:
            by_sub.setdefault(m.subscription_id, []).append(m)
        out: dict[str, list[tuple[Match, int]]] = {}
        try:
            with self.engine.begin() as conn:
                for sub_id in sorted(by_sub):
                    numbered = self._append_one(conn, sub_id, by_sub[sub_id], keep)
                    if numbered:
                        out[sub_id] = numbered
        except SQLAlchemyError as exc:
            raise StoreError(f"event log write failed: {type(exc).__name__}") from exc
        return out

    @staticmethod
    def _append_one(
        conn: Connection, sub_id: str, matches: list[Match], keep: int
    ) -> list[tuple[Match, int]]:
        # Lock the counter row first: the statement that serialises numbering.
        counter = conn.execute(
            update(_S)
            .where(_S.id == sub_id)
            .values(events_since_start=_S.events_since_start)
            .returning(_S.events_since_start)
        ).scalar_one_or_none()
        if counter is None:
            return []  # deleted meanwhile

        unique: dict[tuple[str, int], Match] = {}
        for m in matches:
            unique.setdefault((m.kiosk_id, m.seq), m)
        known = {
            (k, s): n
            for k, s, n in conn.execute(
                select(_E.kiosk_id, _E.seq, _E.number).where(
                    _E.subscription_id == sub_id,
                    tuple_(_E.kiosk_id, _E.seq).in_(list(unique)),
                )
            )
        }
        numbered = [(m, known[key]) for key, m in unique.items() if key in known]
        fresh = [m for key, m in unique.items() if key not in known]
        if fresh:
            rows = [
                {
                    "subscription_id": sub_id,
                    "number": counter + i,
                    "kiosk_id": m.kiosk_id,
                    "seq": m.seq,
                    "reading_id": m.reading_id,
                    "at": m.at,
                }
                for i, m in enumerate(fresh, start=1)
            ]
            conn.execute(insert(_E), rows)
            counter += len(fresh)
            conn.execute(
                update(_S).where(_S.id == sub_id).values(events_since_start=counter)
            )
            conn.execute(
                delete(_E).where(
                    _E.subscription_id == sub_id, _E.number <= counter - keep
                )
            )
            numbered.extend(
                (m, counter - len(fresh) + i) for i, m in enumerate(fresh, 1)
            )
        numbered.sort(key=lambda pair: pair[1])
        return numbered

    def events(
        self, sub_id: str, since: int, until: int, limit: int, with_focus: bool
    ) -> tuple[list[Event], int | None]:
        """Return logged events numbered ``since..until`` and the oldest one kept.

        With ``with_focus`` each event carries its reading and patient_ref, when
        the reading is still stored.
        """
        query = (
            select(_E.number, _E.reading_id, _E.at)
            .where(_E.subscription_id == sub_id, _E.number >= since, _E.number <= until)
            .order_by(_E.number)
            .limit(limit)
        )
        oldest = (
            select(_E.number)
            .where(_E.subscription_id == sub_id)
            .order_by(_E.number)
            .limit(1)
        )
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
                first = conn.execute(oldest).scalar_one_or_none()
                focus = (
                    self._focus(conn, [r.reading_id for r in rows])
                    if with_focus
                    else {}
                )
        except SQLAlchemyError as exc:
            raise StoreError(f"event log read failed: {type(exc).__name__}") from exc
        events = []
        for r in rows:
            reading, patient = focus.get(r.reading_id, (None, None))
            events.append(Event(r.number, r.reading_id, utc(r.at), reading, patient))
        return events, first

    @staticmethod
    def _focus(
        conn: Connection, reading_ids: list[int]
    ) -> dict[int, tuple[StoredReading, str | None]]:
        out: dict[int, tuple[StoredReading, str | None]] = {}
        if not reading_ids:
            return out
        query = (
            select(*ReadingRow.__table__.columns, Scan.patient_ref)
            .outerjoin(
                Scan,
                and_(
                    Scan.kiosk_id == ReadingRow.kiosk_id,
                    Scan.scan_id == ReadingRow.scan_id,
                ),
            )
            .where(ReadingRow.id.in_(reading_ids))
        )
        for row in conn.execute(query):
            out[row.id] = (reading_from_row(row), row.patient_ref)
        return out

    # -- binding tokens ----------------------------------------------------

    def issue_token(
        self, token: str, binding: Binding, expires_at: datetime, now: datetime
    ) -> None:
        """Store a binding token (by hash) and drop expired ones."""
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(_T).where(_T.expires_at < now - timedelta(hours=1)))
                conn.execute(
                    insert(_T).values(
                        token_hash=token_hash(token),
                        subscription_id=binding.subscription_id,
                        subject=binding.subject,
                        observations=binding.observations,
                        access_jti=binding.access_jti,
                        access_expires_at=binding.access_expires_at,
                        expires_at=expires_at,
                        used_at=None,
                    )
                )
        except SQLAlchemyError as exc:
            raise StoreError(
                f"binding token write failed: {type(exc).__name__}"
            ) from exc

    def redeem_token(self, token: str, now: datetime) -> Binding | None:
        """Use a binding token once; None when unknown, expired or already used."""
        hashed = token_hash(token)
        try:
            with self.engine.begin() as conn:
                used = conn.execute(
                    update(_T)
                    .where(
                        _T.token_hash == hashed,
                        _T.used_at.is_(None),
                        _T.expires_at > now,
                    )
                    .values(used_at=now)
                ).rowcount
                if used != 1:
                    return None
                row = conn.execute(select(_T).where(_T.token_hash == hashed)).one()
        except SQLAlchemyError as exc:
            raise StoreError(
                f"binding token read failed: {type(exc).__name__}"
            ) from exc
        return Binding(
            subscription_id=row.subscription_id,
            subject=row.subject,
            observations=row.observations,
            access_jti=row.access_jti,
            access_expires_at=utc(row.access_expires_at),
        )
