"""Subscription resources in and out: R4 Subscriptions, status Parameters, Bundles.

Shapes follow the Subscriptions R5 Backport IG (STU 1.1) for FHIR R4: the
Subscription names its topic in ``criteria``; notifications are ``history``
Bundles whose first entry is a ``Parameters`` resource with the profile
``backport-subscription-status-r4``; event numbers travel as strings.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from api.fhir import mapping
from api.fhir.search import FhirError
from api.fhir.subscriptions import criteria
from bridge.store.db import StoredReading

JsonDict = dict[str, Any]

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport"
SUBSCRIPTION_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription"
STATUS_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription-status-r4"
FILTER_EXTENSION = f"{BACKPORT}/StructureDefinition/backport-filter-criteria"
CONTENT_EXTENSION = f"{BACKPORT}/StructureDefinition/backport-payload-content"
HEARTBEAT_EXTENSION = f"{BACKPORT}/StructureDefinition/backport-heartbeat-period"
CHANNEL_TYPE_EXTENSION = f"{BACKPORT}/StructureDefinition/backport-channel-type"
# Optional channel extensions we accept and honour trivially: every notification
# carries at most one event, and a socket send has no separate timeout.
IGNORED_CHANNEL_EXTENSIONS = (
    f"{BACKPORT}/StructureDefinition/backport-timeout",
    f"{BACKPORT}/StructureDefinition/backport-max-count",
)
FHIR_JSON = "application/fhir+json"
CHANNEL_TYPE = "websocket"


class Content(StrEnum):
    """How much of the focus resource a notification carries."""

    EMPTY = "empty"
    ID_ONLY = "id-only"
    FULL_RESOURCE = "full-resource"


class Status(StrEnum):
    """Subscription.status (R4 ``subscription-status``)."""

    REQUESTED = "requested"
    ACTIVE = "active"
    ERROR = "error"
    OFF = "off"


class NotificationType(StrEnum):
    """R5 ``subscription-notification-type``."""

    HANDSHAKE = "handshake"
    HEARTBEAT = "heartbeat"
    EVENT = "event-notification"
    QUERY_STATUS = "query-status"
    QUERY_EVENT = "query-event"


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    """A validated request to subscribe, in the terms the server keeps."""

    filters: list[str]
    content: Content
    heartbeat_seconds: int | None
    reason: str
    end_at: datetime | None


@dataclass(frozen=True, slots=True)
class SubscriptionRecord:
    """A stored Subscription."""

    id: str
    owner: str
    status: Status
    topic: str
    filters: list[str]
    content: Content
    heartbeat_seconds: int | None
    reason: str
    end_at: datetime | None
    created_at: datetime
    events_since_start: int
    error: str | None

    def effective_status(self, now: datetime) -> Status:
        """Return the status, ``off`` once ``end`` has passed."""
        if self.end_at is not None and self.end_at <= now:
            return Status.OFF
        return self.status


@dataclass(frozen=True, slots=True)
class Event:
    """One numbered event: the reading that matched, when it was stored."""

    number: int
    reading_id: int
    at: datetime
    # The focus, when the caller has it at hand (None: load it, or it is purged).
    reading: StoredReading | None = None
    patient_ref: str | None = None


def _unprocessable(message: str) -> FhirError:
    return FhirError(422, "not-supported", message)


def _extensions(element: Any, url: str) -> list[Any]:
    found = getattr(element, "extension", None) or []
    return [e for e in found if e.url == url]


def parse_subscription(
    body: bytes, heartbeat_range: tuple[int, int], now: datetime
) -> SubscriptionRequest:
    """Validate a POSTed Subscription with fhir.resources and our rules.

    Raises FhirError: 400 for JSON or a resource that is not a valid R4
    Subscription, 422 for one we will not serve (topic, channel, payload, filter).
    """
    from fhir.resources.R4B.subscription import Subscription

    # Structure: JSON, the resource type, then the R4(B) model.
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FhirError(400, "invalid", "body is not JSON") from exc
    if not isinstance(raw, dict) or raw.get("resourceType") != "Subscription":
        raise FhirError(400, "invalid", "body must be a Subscription resource")
    try:
        model = Subscription.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "resource"
        raise FhirError(400, "structure", f"{where}: {first['msg']}"[:300]) from exc
    # The model takes any code; the server sets the status itself (requested).
    if model.status not in tuple(Status):
        raise FhirError(
            400, "code-invalid", "status must be a subscription-status code"
        )

    # Topic and filters.
    if model.criteria != criteria.TOPIC_URL:
        raise _unprocessable(f"unknown topic; this server offers {criteria.TOPIC_URL}")
    filters = [
        str(e.valueString)
        for e in _extensions(model.criteria__ext, FILTER_EXTENSION)
        if e.valueString is not None
    ]
    try:
        criteria.parse_filter(filters)
    except criteria.FilterError as exc:
        raise _unprocessable(f"filter-criteria: {exc}") from exc

    # Channel, payload, content, heartbeat.
    channel = model.channel
    if channel.type != CHANNEL_TYPE or _extensions(
        channel.type__ext, CHANNEL_TYPE_EXTENSION
    ):
        raise _unprocessable("only the websocket channel type is supported")
    if channel.payload not in (None, FHIR_JSON):
        raise _unprocessable(f"only the {FHIR_JSON} payload is supported")
    content = Content.ID_ONLY
    for ext in _extensions(channel.payload__ext, CONTENT_EXTENSION):
        if ext.valueCode not in tuple(Content):
            raise _unprocessable(
                "payload content must be empty, id-only or full-resource"
            )
        content = Content(ext.valueCode)
    heartbeat: int | None = None
    for ext in _extensions(channel, HEARTBEAT_EXTENSION):
        low, high = heartbeat_range
        value = ext.valueUnsignedInt
        if value is None or not low <= value <= high:
            raise _unprocessable(f"heartbeat period must be {low}..{high} seconds")
        heartbeat = int(value)
    known = (HEARTBEAT_EXTENSION, *IGNORED_CHANNEL_EXTENSIONS)
    for ext in channel.extension or []:
        if ext.url not in known:
            raise _unprocessable("unsupported channel extension")

    end_at = None
    if model.end is not None:
        end_at = model.end if model.end.tzinfo else model.end.replace(tzinfo=UTC)
        if end_at <= now:
            raise _unprocessable("end lies in the past")
    return SubscriptionRequest(
        filters=filters,
        content=content,
        heartbeat_seconds=heartbeat,
        reason=str(model.reason)[:500],
        end_at=end_at,
    )


# -- out ---------------------------------------------------------------------


def subscription_resource(record: SubscriptionRecord, now: datetime) -> JsonDict:
    """Render a stored Subscription as an R4 backport Subscription."""
    channel: JsonDict = {}
    if record.heartbeat_seconds is not None:
        channel["extension"] = [
            {"url": HEARTBEAT_EXTENSION, "valueUnsignedInt": record.heartbeat_seconds}
        ]
    channel["type"] = CHANNEL_TYPE
    channel["payload"] = FHIR_JSON
    channel["_payload"] = {
        "extension": [{"url": CONTENT_EXTENSION, "valueCode": record.content.value}]
    }
    resource: JsonDict = {
        "resourceType": "Subscription",
        "id": record.id,
        "meta": {"profile": [SUBSCRIPTION_PROFILE]},
        "status": record.effective_status(now).value,
    }
    if record.end_at is not None:
        resource["end"] = mapping.instant(record.end_at)
    resource["reason"] = record.reason
    resource["criteria"] = record.topic
    if record.filters:
        resource["_criteria"] = {
            "extension": [
                {"url": FILTER_EXTENSION, "valueString": f} for f in record.filters
            ]
        }
    if record.error:
        resource["error"] = record.error
    resource["channel"] = channel
    return resource


def status_parameters(
    record: SubscriptionRecord,
    kind: NotificationType,
    base: str,
    now: datetime,
    events: Sequence[Event] = (),
    content: Content | None = None,
    since_start: int | None = None,
) -> JsonDict:
    """Build the R4 SubscriptionStatus: ``Parameters`` per backport-subscription-status-r4.

    ``events-since-subscription-start`` is ``since_start`` when given (a socket
    reports what it has delivered), else the last event's number for an event
    notification, else the Subscription's counter.
    """
    content = content or record.content
    if since_start is None:
        since_start = (
            events[-1].number
            if kind is NotificationType.EVENT and events
            else record.events_since_start
        )
    params: list[JsonDict] = [
        {
            "name": "subscription",
            "valueReference": {"reference": f"{base}/Subscription/{record.id}"},
        }
    ]
    if content is not Content.EMPTY:
        params.append({"name": "topic", "valueCanonical": record.topic})
    params.append({"name": "status", "valueCode": record.effective_status(now).value})
    params.append({"name": "type", "valueCode": kind.value})
    params.append(
        {"name": "events-since-subscription-start", "valueString": str(since_start)}
    )
    for event in events:
        parts: list[JsonDict] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": mapping.instant(event.at)},
        ]
        if content is not Content.EMPTY:
            parts.append(
                {
                    "name": "focus",
                    "valueReference": {
                        "reference": f"{base}/Observation/{event.reading_id}"
                    },
                }
            )
        params.append({"name": "notification-event", "part": parts})
    if record.error and kind in (
        NotificationType.QUERY_STATUS,
        NotificationType.HANDSHAKE,
    ):
        params.append({"name": "error", "valueCodeableConcept": {"text": record.error}})
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": params,
    }


def status_entry(parameters: JsonDict, base: str, subscription_id: str) -> JsonDict:
    """Wrap the status in a history entry whose request matches ``$status``."""
    return {
        "fullUrl": f"urn:uuid:{parameters['id']}",
        "resource": parameters,
        "request": {
            "method": "GET",
            "url": f"{base}/Subscription/{subscription_id}/$status",
        },
        "response": {"status": "200"},
    }


def notification_bundle(
    record: SubscriptionRecord,
    kind: NotificationType,
    base: str,
    now: datetime,
    events: Sequence[Event] = (),
    content: Content | None = None,
    warning: str | None = None,
    since_start: int | None = None,
) -> JsonDict:
    """Build a notification (or ``$events`` answer): a ``history`` Bundle.

    With ``full-resource`` content each event's Observation follows as an entry;
    one whose reading is no longer stored keeps its focus reference and gets an
    entry with a 404 response instead.
    """
    content = content or record.content
    parameters = status_parameters(
        record, kind, base, now, events, content, since_start
    )
    first = status_entry(parameters, base, record.id)
    if warning:
        first["response"]["outcome"] = mapping.operation_outcome(
            "informational", warning, severity="warning"
        )
    entries = [first]
    if content is Content.FULL_RESOURCE:
        for event in events:
            url = f"{base}/Observation/{event.reading_id}"
            if event.reading is None:
                entries.append(
                    {
                        "fullUrl": url,
                        "request": {
                            "method": "GET",
                            "url": f"Observation/{event.reading_id}",
                        },
                        "response": {"status": "404"},
                    }
                )
                continue
            entries.append(
                {
                    "fullUrl": url,
                    "resource": mapping.observation(event.reading, event.patient_ref),
                    "request": {"method": "POST", "url": "Observation"},
                    "response": {"status": "201"},
                }
            )
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": mapping.instant(now)},
        "type": "history",
        "timestamp": mapping.instant(now),
        "entry": entries,
    }


def searchset(entries: list[JsonDict], self_url: str, now: datetime) -> JsonDict:
    """Build a searchset Bundle of ready resources (all ``match``)."""
    return mapping.bundle(
        entries=[
            {"fullUrl": url, "resource": resource, "search": {"mode": "match"}}
            for url, resource in ((e["fullUrl"], e["resource"]) for e in entries)
        ],
        links=[("self", self_url)],
        total=len(entries),
        timestamp=now,
    )


def binding_parameters(
    token: str, expires_at: datetime, subscription_id: str, websocket_url: str
) -> JsonDict:
    """Answer ``$get-ws-binding-token``."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "token", "valueString": token},
            {"name": "expiration", "valueDateTime": mapping.instant(expires_at)},
            {"name": "subscription", "valueString": subscription_id},
            {"name": "websocket-url", "valueUrl": websocket_url},
        ],
    }


def now_utc() -> datetime:
    """Return the current time, aware, in UTC."""
    return datetime.now(UTC)
