"""HTTP routes of the FHIR R4 facade under ``/fhir``.

Every response, errors included, is ``application/fhir+json``; errors are
OperationOutcomes. Handlers read query parameters themselves, so FastAPI's 422
never reaches a FHIR client, and :class:`FhirRoute` turns every exception into an
OperationOutcome without internals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from api.auth import AuthError
from api.deps import get_bridge
from api.fhir import mapping, search
from api.fhir.queries import FhirQueries, KioskRow, Page, Row, cursor_key
from api.fhir.search import FhirError
from api.security import RateLimitError
from bridge.errors import StoreError
from bridge.store.db import utc
from bridge.store.models import AuditEvent

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_ACCEPTABLE = {"*/*", "application/*", "application/json", FHIR_JSON}
_FORM = "application/x-www-form-urlencoded"
_MAX_FORM_BYTES = 64 * 1024
_RESOURCE_TYPES = ("Observation", "Device", "Patient", "AuditEvent", "Subscription")


class FhirResponse(Response):
    """A FHIR JSON resource."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        # orjson: a page of 50 Observations encodes ~10x faster than with json.
        return orjson.dumps(content)


def outcome_response(status: int, code: str, message: str) -> FhirResponse:
    """Answer with an OperationOutcome."""
    return FhirResponse(mapping.operation_outcome(code, message), status_code=status)


_HTTP_ISSUE = {404: "not-found", 405: "not-supported", 406: "not-supported"}


class FhirRoute(APIRoute):
    """A route whose every failure becomes an OperationOutcome."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        route_path = self.path

        async def fhir_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except FhirError as exc:
                return outcome_response(exc.status, exc.code, exc.message)
            except StoreError:
                # The route template, never the URL: ids may name a patient.
                log.warning("FHIR %s: database unavailable", route_path)
                return outcome_response(503, "transient", "database unavailable")
            except RequestValidationError:
                return outcome_response(400, "invalid", "invalid request")
            except HTTPException as exc:
                code = _HTTP_ISSUE.get(exc.status_code, "processing")
                return outcome_response(exc.status_code, code, "request failed")
            except (AuthError, RateLimitError):
                raise  # answered as OperationOutcome by the app's handlers (api.errors)
            except Exception:
                log.exception("FHIR %s failed", route_path)
                return outcome_response(500, "exception", "internal server error")

        return fhir_handler


router = APIRouter(prefix="/fhir", tags=["fhir"], route_class=FhirRoute)


# -- request helpers -----------------------------------------------------------


def _negotiate(request: Request, params: Sequence[tuple[str, str]]) -> None:
    """Refuse (406) what we cannot send: only FHIR JSON is produced."""
    for name, value in params:
        if name == "_format" and value not in search.JSON_FORMATS:
            raise FhirError(406, "not-supported", "only JSON is supported")
    accept = request.headers.get("accept")
    if not accept:
        return
    for item in accept.split(","):
        media, *options = (part.strip() for part in item.split(";"))
        if "q=0" in options or "q=0.0" in options:
            continue
        if media.lower() in _ACCEPTABLE:
            return
    raise FhirError(406, "not-supported", f"cannot produce {accept[:80]}")


def _lenient(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip() == "handling=lenient" for p in prefer.split(";"))


def _checked(
    request: Request, pairs: Sequence[tuple[str, str]], allowed: Sequence[str]
) -> list[tuple[str, str]]:
    _negotiate(request, pairs)
    return search.check_names(pairs, allowed, lenient=_lenient(request))


def _base(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}/fhir"


def _link(request: Request, path: str, params: Sequence[tuple[str, str]]) -> str:
    query = urlencode(params)
    return f"{_base(request)}/{path}" + (f"?{query}" if query else "")


def _next_link(
    request: Request, path: str, params: Sequence[tuple[str, str]], cursor: str
) -> str:
    kept = [(n, v) for n, v in params if n != "_cursor"]
    return _link(request, path, [*kept, ("_cursor", cursor)])


def _queries(request: Request) -> FhirQueries:
    # The bridge is read straight off the app: a sync dependency would cost a
    # thread hop per request.
    return FhirQueries(get_bridge(request).store.engine)


def _now() -> datetime:
    return datetime.now(UTC)


# -- capability ----------------------------------------------------------------

CAPABILITY_DATE = "2026-12-03"
SOFTWARE_VERSION = "0.1.0"
LASTN_DEFINITION = "http://hl7.org/fhir/OperationDefinition/Observation-lastn"
EXPORT_DEFINITION = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"
BULK_DATA_CAPABILITY = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
_EXPORT_DOC = (
    "Bulk Data $export (IG v2.0.0), system level only (no Patient or Group "
    "export), of Observations as NDJSON files; see api/fhir/export.py. Needs "
    "'Prefer: respond-async' and scope system/Observation.read. Parameters: _type "
    "(Observation), _outputFormat (application/fhir+ndjson, application/ndjson, "
    "ndjson), _since and _until (instants on meta.lastUpdated: _since < lastUpdated "
    "<= _until), _typeFilter (one Observation search, e.g. Observation?date=ge2026-11 "
    "for measurement times). Status and files need the token of the client that "
    "started the export; jobs and files expire after a configured time."
)
_READ_SEARCH = [{"code": "read"}, {"code": "search-type"}]
_RESULT_DOC = (
    "Read-only. Result parameters: _count (1-200, default 50), _sort (date, -date; "
    "default store order), _total (none, estimate, accurate), _format (json), "
    "_cursor (opaque, from next links). Unknown parameters are refused with 400 "
    "unless the request has 'Prefer: handling=lenient'. Search also by POST to "
    "[type]/_search is supported for Observation only. Device and Patient "
    "searches take identifier, _count and _cursor."
)


def _search_params(table: dict[str, tuple[str, str]]) -> list[mapping.JsonDict]:
    return [
        {"name": name, "definition": definition, "type": kind}
        for name, (kind, definition) in table.items()
    ]


def capability_statement(base: str) -> mapping.JsonDict:
    """Describe exactly the interactions and parameters this facade implements."""
    # Imported here: the subscriptions package imports this module.
    from api.fhir.subscriptions import capability as subscriptions

    profiles = [
        mapping.VITALSIGNS_PROFILE,
        *(mc.specific_profile for mc in mapping.METRIC_CODINGS.values()),
    ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": CAPABILITY_DATE,
        "publisher": "kiosk-vitals",
        "kind": "instance",
        "instantiates": [BULK_DATA_CAPABILITY, subscriptions.INSTANTIATES],
        "software": {"name": "kiosk-vitals FHIR facade", "version": SOFTWARE_VERSION},
        "implementation": {
            "description": "Camera vital signs from clinic kiosks (read-only)",
            "url": base,
        },
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [
            {
                "extension": [subscriptions.websocket_extension(base)],
                "mode": "server",
                "documentation": _RESULT_DOC,
                "operation": [
                    {
                        "name": "export",
                        "definition": EXPORT_DEFINITION,
                        "documentation": _EXPORT_DOC,
                    }
                ],
                "resource": [
                    {
                        "type": "Observation",
                        "supportedProfile": [p for p in profiles if p],
                        "interaction": _READ_SEARCH,
                        "searchInclude": list(search.OBSERVATION_INCLUDES),
                        "searchParam": _search_params(search.OBSERVATION_PARAMS),
                        "operation": [
                            {"name": "lastn", "definition": LASTN_DEFINITION}
                        ],
                    },
                    {
                        "type": "Device",
                        "interaction": _READ_SEARCH,
                        "searchParam": _search_params(search.DEVICE_PARAMS),
                    },
                    {
                        "type": "Patient",
                        "interaction": _READ_SEARCH,
                        "searchParam": _search_params(search.PATIENT_PARAMS),
                    },
                    {
                        "type": "AuditEvent",
                        "documentation": "Admins only (scope vitals.admin); the "
                        "newest records first, no search parameters but _count.",
                        "interaction": [{"code": "search-type"}],
                    },
                    subscriptions.subscription_resource(),
                ],
            }
        ],
    }


@router.get("/metadata")
def metadata(request: Request) -> Response:
    """Return the CapabilityStatement of exactly what this facade implements."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    return FhirResponse(capability_statement(_base(request)))


# -- Observation ---------------------------------------------------------------


_OBSERVATION_ALLOWED = (*search.OBSERVATION_PARAMS, *search.OBSERVATION_RESULT_PARAMS)


def _observation_bundle(request: Request, pairs: list[tuple[str, str]]) -> Response:
    parsed = search.parse_observation_search(pairs)
    queries = _queries(request)
    page: Page = queries.search_observations(parsed)

    base = _base(request)
    entries = [
        mapping.entry(
            f"{base}/Observation/{row.reading.id}",
            mapping.observation(row.reading, row.patient_ref),
            "match",
        )
        for row in page.rows
    ]
    entries.extend(_included(base, queries, page.rows, parsed))
    links = [("self", _link(request, "Observation", pairs))]
    if page.more:
        token = search.encode_cursor(
            parsed.sort, cursor_key(page.rows[-1], parsed.sort)
        )
        links.append(("next", _next_link(request, "Observation", pairs, token)))
    return FhirResponse(
        mapping.bundle(entries=entries, links=links, total=page.total, timestamp=_now())
    )


def _included(
    base: str, queries: FhirQueries, rows: list[Row], parsed: search.ObservationSearch
) -> list[mapping.JsonDict]:
    out: list[mapping.JsonDict] = []
    if parsed.include_device and rows:
        kiosk_ids = {row.reading.kiosk_id for row in rows}
        for k in queries.kiosks([kiosk_ids]):
            resource = mapping.device(k.kiosk_id, k.agent_version, k.last_seen_at)
            out.append(
                mapping.entry(f"{base}/Device/{resource['id']}", resource, "include")
            )
    if parsed.include_patient:
        refs = sorted({row.patient_ref for row in rows if row.patient_ref is not None})
        for ref in refs:
            resource = mapping.patient(ref)
            out.append(
                mapping.entry(f"{base}/Patient/{resource['id']}", resource, "include")
            )
    return out


@router.get("/Observation")
def search_observations(request: Request) -> Response:
    """Search Observations (readings); see the CapabilityStatement for parameters."""
    pairs = _checked(request, request.query_params.multi_items(), _OBSERVATION_ALLOWED)
    return _observation_bundle(request, pairs)


@router.post("/Observation/_search")
async def search_observations_post(request: Request) -> Response:
    """Search Observations with the parameters in a form body (FHIR POST search)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != _FORM:
        raise FhirError(415, "not-supported", f"search body must be {_FORM}")
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        raise FhirError(413, "too-long", "search body too large")
    try:
        form = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise FhirError(400, "invalid", "search body is not UTF-8") from exc
    raw = [*request.query_params.multi_items(), *form]
    pairs = _checked(request, raw, _OBSERVATION_ALLOWED)
    return await run_in_threadpool(_observation_bundle, request, pairs)


@router.get("/Observation/$lastn")
def lastn(request: Request) -> Response:
    """Return the latest ``max`` Observations per code per patient (or device)."""
    allowed = (*search.LASTN_PARAMS, "_format")
    pairs = _checked(request, request.query_params.multi_items(), allowed)
    parsed, max_n = search.parse_lastn([(n, v) for n, v in pairs if n != "_format"])
    rows, truncated = _queries(request).lastn(parsed, max_n)

    base = _base(request)
    entries = [
        mapping.entry(
            f"{base}/Observation/{row.reading.id}",
            mapping.observation(row.reading, row.patient_ref),
            "match",
        )
        for row in rows
    ]
    if truncated:
        warning = mapping.operation_outcome(
            "too-costly",
            "result truncated; narrow the search with patient or code",
            severity="warning",
        )
        entries.append({"resource": warning, "search": {"mode": "outcome"}})
    links = [("self", _link(request, "Observation/$lastn", pairs))]
    total = None if truncated else len(rows)
    return FhirResponse(
        mapping.bundle(entries=entries, links=links, total=total, timestamp=_now())
    )


@router.get("/Observation/{resource_id}")
def read_observation(resource_id: str, request: Request) -> Response:
    """Read one Observation by id."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    row = None
    if mapping.is_decimal(resource_id) and len(resource_id) <= 18:
        row = _queries(request).read_observation(int(resource_id))
    if row is None:
        raise FhirError(404, "not-found", f"Observation/{resource_id} not found")
    return FhirResponse(mapping.observation(row.reading, row.patient_ref))


# -- Device and Patient --------------------------------------------------------


_IDENTIFIER_ALLOWED = ("identifier", *search.RESULT_PARAMS)
_K = TypeVar("_K")


def _identifier_bundle(
    request: Request,
    resource_type: str,
    system: str,
    fetch: Callable[[FhirQueries, list[set[str]], str | None, int], list[_K]],
    build: Callable[[_K], mapping.JsonDict],
    key: Callable[[_K], str],
) -> Response:
    """Answer a Device or Patient search: identifier sets, ``_count``, key cursor."""
    pairs = _checked(request, request.query_params.multi_items(), _IDENTIFIER_ALLOWED)
    sets, count, after = search.parse_identifier_search(pairs, system)
    found = fetch(_queries(request), sets, after, count + 1)
    more = len(found) > count
    found = found[:count]

    base = _base(request)
    entries = []
    for item in found:
        resource = build(item)
        entries.append(
            mapping.entry(f"{base}/{resource_type}/{resource['id']}", resource, "match")
        )
    links = [("self", _link(request, resource_type, pairs))]
    if more:
        token = search.encode_key_cursor(key(found[-1]))
        links.append(("next", _next_link(request, resource_type, pairs, token)))
    total = len(found) if after is None and not more else None
    return FhirResponse(
        mapping.bundle(entries=entries, links=links, total=total, timestamp=_now())
    )


def _device_of(kiosk: KioskRow) -> mapping.JsonDict:
    return mapping.device(kiosk.kiosk_id, kiosk.agent_version, kiosk.last_seen_at)


@router.get("/Device")
def search_devices(request: Request) -> Response:
    """Search Devices (one per kiosk) by identifier."""
    return _identifier_bundle(
        request,
        "Device",
        mapping.KIOSK_SYSTEM,
        FhirQueries.kiosks,
        _device_of,
        lambda kiosk: kiosk.kiosk_id,
    )


@router.get("/Device/{resource_id}")
def read_device(resource_id: str, request: Request) -> Response:
    """Read the Device of one kiosk."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    kiosk = _queries(request).kiosk_for_id(resource_id)
    if kiosk is None:
        raise FhirError(404, "not-found", f"Device/{resource_id} not found")
    return FhirResponse(
        mapping.device(kiosk.kiosk_id, kiosk.agent_version, kiosk.last_seen_at)
    )


@router.get("/Patient")
def search_patients(request: Request) -> Response:
    """Search Patients (the patient_refs scans carry) by identifier."""
    return _identifier_bundle(
        request,
        "Patient",
        mapping.PATIENT_SYSTEM,
        FhirQueries.patients,
        mapping.patient,
        lambda ref: ref,
    )


@router.get("/Patient/{resource_id}")
def read_patient(resource_id: str, request: Request) -> Response:
    """Read one Patient: only its identifier is known."""
    _checked(request, request.query_params.multi_items(), ("_format",))
    ref = _queries(request).patient_for_id(resource_id)
    if ref is None:
        raise FhirError(404, "not-found", f"Patient/{resource_id} not found")
    return FhirResponse(mapping.patient(ref))


# -- AuditEvent (admins only; see api/fhir_guard.py) --------------------------

AUDIT_MAX_COUNT = 200
_AUDIT_ACTIONS = {"read": "R", "subscribe": "R", "fhir.read": "R", "ack": "U"}


def audit_event(row: Any) -> mapping.JsonDict:
    """Map one audit record to an R4 AuditEvent."""
    return {
        "resourceType": "AuditEvent",
        "id": str(row.id),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "action": _AUDIT_ACTIONS.get(row.action, "E"),
        "recorded": mapping.instant(utc(row.at)),
        "outcome": "0" if row.outcome == "ok" else "4",
        "outcomeDesc": row.action,
        "agent": [{"who": {"display": row.actor}, "requestor": True}],
        "source": {"observer": {"display": "kiosk-vitals API"}},
        "entity": [{"description": row.resource}],
    }


@router.get("/AuditEvent")
def search_audit_events(request: Request) -> Response:
    """Return the newest audit records as AuditEvents (``_count``, newest first)."""
    pairs = _checked(request, request.query_params.multi_items(), ("_count", "_format"))
    raw = dict(pairs).get("_count", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= AUDIT_MAX_COUNT:
        raise FhirError(400, "invalid", f"_count must be 1..{AUDIT_MAX_COUNT}")
    request.app.state.auditor.sync()
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(int(raw))
    with request.app.state.bridge.store.engine.connect() as conn:
        rows = conn.execute(query).all()
    base = _base(request)
    entries = [
        mapping.entry(f"{base}/AuditEvent/{r.id}", audit_event(r), "match")
        for r in rows
    ]
    links = [("self", _link(request, "AuditEvent", pairs))]
    return FhirResponse(
        mapping.bundle(entries=entries, links=links, total=None, timestamp=_now())
    )


# -- everything else -----------------------------------------------------------

_KNOWN_PATHS = ("metadata", "Observation/_search", "Observation/$lastn", "$export")

# Included after every other FHIR router (see api/fhir/__init__.py): it answers
# whatever they do not.
fallback = APIRouter(prefix="/fhir", tags=["fhir"], route_class=FhirRoute)


@fallback.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
    include_in_schema=False,
)
def not_implemented(path: str, request: Request) -> Response:
    """Answer 405 for another method on a known resource type, else 404."""
    first = path.split("/", 1)[0]
    known = path in _KNOWN_PATHS or first in _RESOURCE_TYPES
    if known and request.method != "GET":
        return outcome_response(
            405, "not-supported", f"{request.method} is not supported here"
        )
    return outcome_response(404, "not-found", "unknown resource type or operation")
