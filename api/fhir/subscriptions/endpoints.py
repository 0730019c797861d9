"""HTTP side of FHIR Subscriptions: create, read, search, delete and operations.

Scopes: the FHIR guard asks ``system/Subscription.read`` for GET and
``system/Subscription.write`` for POST and DELETE (POST forms of operations
included). Each Subscription belongs to the token subject that created it; other
callers get 404 for it. Notifications and ``$events`` carry Observation ids or
resources only for callers holding ``system/Observation.read``; for others the
content drops to ``empty``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request
from fastapi.security.utils import get_authorization_scheme_param
from starlette.responses import Response

from api.auth import AuthError, Principal
from api.fhir.routes import FhirResponse, FhirRoute, _base, _checked
from api.fhir.search import FhirError
from api.fhir.subscriptions import criteria
from api.fhir.subscriptions.capability import websocket_url
from api.fhir.subscriptions.resources import (
    Content,
    Event,
    NotificationType,
    SubscriptionRecord,
    binding_parameters,
    notification_bundle,
    now_utc,
    parse_subscription,
    searchset,
    status_entry,
    status_parameters,
    subscription_resource,
)
from api.fhir.subscriptions.service import CLOSE_GONE, SubscriptionService
from api.fhir.subscriptions.store import Binding
from api.security import tokens

router = APIRouter(prefix="/fhir", tags=["fhir"], route_class=FhirRoute)

OBSERVATION_READ = "system/Observation.read"
MAX_BODY_BYTES = 64 * 1024
MAX_EVENT_NUMBER = 2**63 - 1


def _service(request: Request) -> SubscriptionService:
    service: SubscriptionService = request.app.state.fhir_subscriptions
    return service


def _principal(request: Request) -> Principal:
    """Return the caller (the FHIR guard has checked token and scope already)."""
    scheme, credentials = get_authorization_scheme_param(
        request.headers.get("authorization")
    )
    if scheme.lower() != "bearer" or not credentials:
        raise AuthError(401, "invalid_token", "bearer token required")
    return tokens(request).verify(credentials)


async def _owned(request: Request, sub_id: str) -> tuple[SubscriptionRecord, Principal]:
    principal = _principal(request)
    record = await asyncio.to_thread(_service(request).store.get, sub_id)
    if record is None or record.owner != principal.subject:
        raise FhirError(404, "not-found", "Subscription not found")
    return record, principal


def _require_reader_for_patient_filter(
    filters: list[str], principal: Principal
) -> None:
    """Refuse a patient filter to a caller who may not read Observations.

    Even empty notifications tell when a named patient was measured.
    """
    if criteria.parse_filter(filters).patients is not None and not principal.allows(
        OBSERVATION_READ
    ):
        raise FhirError(
            403,
            "forbidden",
            f"a patient filter needs scope {OBSERVATION_READ}",
        )


async def _body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise FhirError(413, "too-long", "body too large")
    return body


# -- Subscription ------------------------------------------------------------


@router.post("/Subscription")
async def create_subscription(request: Request) -> Response:
    """Create a websocket Subscription to the vital-signs topic (status requested)."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    principal = _principal(request)
    service = _service(request)
    settings = service.settings
    now = now_utc()
    parsed = parse_subscription(
        await _body(request),
        (settings.heartbeat_min_seconds, settings.heartbeat_max_seconds),
        now,
    )
    if parsed.content is not Content.EMPTY and not principal.allows(OBSERVATION_READ):
        raise FhirError(
            403,
            "forbidden",
            f"{parsed.content.value} notifications need scope {OBSERVATION_READ}; "
            "ask for empty content",
        )
    _require_reader_for_patient_filter(parsed.filters, principal)

    record = await asyncio.to_thread(
        service.store.create,
        uuid.uuid4().hex,
        principal.subject,
        criteria.TOPIC_URL,
        parsed,
        now,
        settings.max_per_owner,
    )
    if record is None:
        raise FhirError(
            422,
            "too-costly",
            f"at most {settings.max_per_owner} Subscriptions per client",
        )
    service.added(record)
    location = f"{_base(request)}/Subscription/{record.id}"
    return FhirResponse(
        subscription_resource(record, now),
        status_code=201,
        headers={"Location": location},
    )


@router.get("/Subscription")
async def search_subscriptions(request: Request) -> Response:
    """List the caller's Subscriptions (``status`` filters)."""
    pairs = _checked(request, request.query_params.multi_items(), ("status", "_format"))
    principal = _principal(request)
    wanted = {v for name, value in pairs if name == "status" for v in value.split(",")}
    records = await asyncio.to_thread(
        _service(request).store.records, principal.subject
    )
    now = now_utc()
    base = _base(request)
    entries = [
        {
            "fullUrl": f"{base}/Subscription/{r.id}",
            "resource": subscription_resource(r, now),
        }
        for r in records
        if not wanted or r.effective_status(now).value in wanted
    ]
    query = "&".join(f"{n}={v}" for n, v in pairs)
    self_url = f"{base}/Subscription" + (f"?{query}" if query else "")
    return FhirResponse(searchset(entries, self_url, now))


@router.get("/Subscription/{sub_id}")
async def read_subscription(sub_id: str, request: Request) -> Response:
    """Read one of the caller's Subscriptions."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    record, _ = await _owned(request, sub_id)
    return FhirResponse(subscription_resource(record, now_utc()))


@router.delete("/Subscription/{sub_id}")
async def delete_subscription(sub_id: str, request: Request) -> Response:
    """Delete a Subscription, its events and its binding tokens; close its sockets."""
    await _owned(request, sub_id)
    service = _service(request)
    await asyncio.to_thread(service.store.delete, sub_id)
    service.removed(sub_id)
    service.close_sockets(sub_id, CLOSE_GONE, "subscription deleted")
    return Response(status_code=204)


# -- operations ----------------------------------------------------------------


# TODO: type-level $status (all of the caller's Subscriptions) and PUT/PATCH of a
# Subscription (the IG's SHOULD) are not implemented; delete and create instead.
@router.get("/Subscription/{sub_id}/$status")
async def subscription_status(sub_id: str, request: Request) -> Response:
    """Return the Subscription's status as a searchset of one status Parameters."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    record, _ = await _owned(request, sub_id)
    now = now_utc()
    base = _base(request)
    params = status_parameters(record, NotificationType.QUERY_STATUS, base, now)
    entry = status_entry(params, base, record.id)
    return FhirResponse(
        searchset([entry], f"{base}/Subscription/{sub_id}/$status", now)
    )


_EVENTS_PARAMS = ("eventsSinceNumber", "eventsUntilNumber", "content")


def _operation_params(body: bytes) -> list[tuple[str, str]]:
    """Read ``(name, value)`` pairs from a Parameters body."""
    try:
        resource = json.loads(body) if body else {"resourceType": "Parameters"}
    except (ValueError, UnicodeDecodeError) as exc:
        raise FhirError(400, "invalid", "body is not JSON") from exc
    if not isinstance(resource, dict) or resource.get("resourceType") != "Parameters":
        raise FhirError(400, "invalid", "body must be a Parameters resource")
    pairs: list[tuple[str, str]] = []
    for p in resource.get("parameter") or []:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise FhirError(400, "invalid", "malformed parameter")
        values = [v for k, v in p.items() if k.startswith("value")]
        if len(values) != 1 or not isinstance(values[0], str | int):
            raise FhirError(
                400, "invalid", f"parameter {p['name'][:40]} needs one value"
            )
        pairs.append((p["name"], str(values[0])))
    return pairs


def _number(pairs: list[tuple[str, str]], name: str) -> int | None:
    values = [v for n, v in pairs if n == name]
    if not values:
        return None
    if len(values) > 1 or not values[0].isascii() or not values[0].isdigit():
        raise FhirError(400, "invalid", f"{name} must be one non-negative integer")
    number = int(values[0])
    if number > MAX_EVENT_NUMBER:
        raise FhirError(400, "invalid", f"{name} is too large")
    return number


async def _events(
    request: Request, sub_id: str, pairs: list[tuple[str, str]]
) -> Response:
    record, principal = await _owned(request, sub_id)
    service = _service(request)
    since_asked = _number(pairs, "eventsSinceNumber")
    until_asked = _number(pairs, "eventsUntilNumber")
    if (
        since_asked is not None
        and until_asked is not None
        and since_asked > until_asked
    ):
        raise FhirError(400, "invalid", "eventsSinceNumber is after eventsUntilNumber")
    contents = [v for n, v in pairs if n == "content"]
    if len(contents) > 1 or (contents and contents[0] not in tuple(Content)):
        raise FhirError(
            400, "invalid", "content must be empty, id-only or full-resource"
        )
    content = Content(contents[0]) if contents else record.content
    if not principal.allows(OBSERVATION_READ):
        content = Content.EMPTY
    newest = record.events_since_start
    since = max(since_asked or 1, 1)
    until = newest if until_asked is None else min(until_asked, newest)

    limit = service.settings.events_page_max
    events: list[Event] = []
    oldest: int | None = None
    if since <= until:
        events, oldest = await asyncio.to_thread(
            service.store.events,
            sub_id,
            since,
            until,
            limit,
            content is Content.FULL_RESOURCE,
        )
    warning = None
    first_kept = oldest if oldest is not None else newest + 1
    if since < first_kept and since <= until:
        warning = (
            f"events {since}..{min(first_kept - 1, until)} were purged "
            f"(the last {service.settings.events_kept} are kept)"
        )
    elif len(events) == limit and events[-1].number < until:
        warning = (
            f"at most {limit} events per call; ask again from {events[-1].number + 1}"
        )
    bundle = notification_bundle(
        record,
        NotificationType.QUERY_EVENT,
        _base(request),
        now_utc(),
        events,
        content,
        warning,
    )
    return FhirResponse(bundle)


@router.get("/Subscription/{sub_id}/$events")
async def subscription_events(sub_id: str, request: Request) -> Response:
    """Return logged events by number (``eventsSinceNumber``..``eventsUntilNumber``)."""
    pairs = _checked(
        request, request.query_params.multi_items(), (*_EVENTS_PARAMS, "_format")
    )
    return await _events(request, sub_id, [(n, v) for n, v in pairs if n != "_format"])


@router.post("/Subscription/{sub_id}/$events")
async def subscription_events_post(sub_id: str, request: Request) -> Response:
    """``$events`` with a Parameters body."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    pairs = _operation_params(await _body(request))
    for name, _ in pairs:
        if name not in _EVENTS_PARAMS:
            raise FhirError(400, "invalid", f"unknown parameter {name[:40]!r}")
    return await _events(request, sub_id, pairs)


@router.get("/Subscription/{sub_id}/$get-ws-binding-token")
async def get_ws_binding_token(sub_id: str, request: Request) -> Response:
    """Issue a single-use, short-lived token that binds a socket to the Subscription."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    record, principal = await _owned(request, sub_id)
    _require_reader_for_patient_filter(record.filters, principal)
    service = _service(request)
    now = now_utc()
    expires_at = now + timedelta(seconds=service.settings.binding_token_ttl_seconds)
    token = secrets.token_urlsafe(32)
    binding = Binding(
        subscription_id=sub_id,
        subject=principal.subject,
        observations=principal.allows(OBSERVATION_READ),
        access_jti=principal.jti,
        access_expires_at=datetime.fromtimestamp(principal.expires_at, UTC),
    )
    await asyncio.to_thread(service.store.issue_token, token, binding, expires_at, now)
    base = _base(request)
    return FhirResponse(
        binding_parameters(token, expires_at, sub_id, websocket_url(base))
    )
