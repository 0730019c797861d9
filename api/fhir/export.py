"""FHIR Bulk Data ``$export`` of Observations as NDJSON files, run in the background.

The system-level export of the HL7 FHIR Bulk Data Access IG v2.0.0
(http://hl7.org/fhir/uv/bulkdata/STU2/export.html), with its asynchronous request
pattern:

1. ``GET /fhir/$export`` with ``Prefer: respond-async`` answers ``202 Accepted``
   with the status URL in ``Content-Location`` (400 without the header);
2. ``GET`` on the status URL answers ``202`` with ``X-Progress`` and
   ``Retry-After`` while the job is queued or running, ``200`` with the JSON
   manifest (and ``Expires``) when it is done, ``500`` with an OperationOutcome
   when it failed; ``DELETE`` cancels the job, deletes its files and makes the
   status URL answer 404;
3. ``GET`` on each manifest ``output[].url`` returns one ``application/fhir+ndjson``
   file. Status and file requests need the bearer token (``requiresAccessToken``)
   of the client that started the job: anyone else gets 404.

Kick-off parameters: ``_type`` (only ``Observation``), ``_outputFormat``
(``application/fhir+ndjson``, ``application/ndjson``, ``ndjson``), ``_since`` and
``_until`` (instants compared with ``meta.lastUpdated``, i.e. when the bridge stored
the reading: ``_since`` < lastUpdated <= ``_until``; ``_until`` comes from the IG's
STU3), and ``_typeFilter`` with one Observation search, e.g.
``Observation?date=ge2026-11-01&date=lt2026-12-01`` for a range of measurement
times. Other parameters are refused with 400, or with ``Prefer: handling=lenient``
ignored and reported in the manifest's ``error`` files.

Each job is a row of ``export_jobs`` and, while it runs, an asyncio task in the
process that accepted it. The task reads keyset pages (store order, ``id``)
through :class:`~api.fhir.queries.FhirQueries` in a worker thread, maps them with
:func:`api.fhir.mapping.observation` (the resources the search returns) and appends
them to files of at most ``export.max_resources_per_file`` resources, so memory
stays bounded by one page whatever the export's size. Files live under
``export.directory``, one sub-directory per job; API replicas must share it.

A process touches its queued and running jobs every ``sweep_interval_seconds``. A
job that nobody touched for ``stale_after_seconds`` lost its process (crash,
restart) and is marked failed; the client starts a new export. A clean shutdown
marks its interrupted jobs failed at once. Finished and failed jobs, and their
files, are deleted ``retention_seconds`` after they end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import IO, Annotated, Any, cast
from urllib.parse import parse_qsl, unquote_plus, urlencode

import orjson
from fastapi import APIRouter, Depends, Request
from sqlalchemy import Engine, Table, delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import FileResponse, JSONResponse, Response

from api.auth import AuthError, Principal
from api.fhir import mapping, search
from api.fhir.queries import FhirQueries
from api.fhir.routes import FhirResponse, FhirRoute, outcome_response
from api.fhir.search import DateFilter, DateRange, FhirError, ObservationSearch, Sort
from api.fhir_guard import fhir_guard
from bridge.config import ExportSettings
from bridge.errors import StoreError
from bridge.store.db import utc
from bridge.store.models import ExportJob

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({NDJSON, "application/ndjson", "ndjson"})
EXPORTABLE_TYPES = ("Observation",)
SCOPE = "system/Observation.read"
KICKOFF_PARAMS = ("_type", "_outputFormat", "_since", "_until", "_typeFilter")
STATUS_PATH = "$export-status"
FILE_PATH = "$export-file"
PROGRESS_INTERVAL_SECONDS = 1.0
CANCEL_WAIT_SECONDS = 10.0
_ONE_MICROSECOND = timedelta(microseconds=1)
_INSTANT_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"
)
_JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")


# Job states; a cancelled job's row is deleted.
ACCEPTED = "accepted"
RUNNING = "in-progress"
COMPLETED = "completed"
FAILED = "failed"
ACTIVE = (ACCEPTED, RUNNING)


# -- kick-off parameters -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """What a kick-off asked for, checked; kept as JSON with its job."""

    since: datetime | None = None
    until: datetime | None = None
    type_filter: str | None = None  # one Observation search's query string
    nothing: bool = False  # handling=lenient and no exportable _type left
    ignored: tuple[str, ...] = ()  # what handling=lenient let through unheeded

    def to_json(self) -> str:
        """Serialise for the job row."""
        return json.dumps(
            {
                "since": None if self.since is None else self.since.isoformat(),
                "until": None if self.until is None else self.until.isoformat(),
                "type_filter": self.type_filter,
                "nothing": self.nothing,
                "ignored": list(self.ignored),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ExportRequest:
        """Read back what :meth:`to_json` wrote."""
        data = json.loads(text)
        since, until = data["since"], data["until"]
        return cls(
            since=None if since is None else datetime.fromisoformat(since),
            until=None if until is None else datetime.fromisoformat(until),
            type_filter=data["type_filter"],
            nothing=data["nothing"],
            ignored=tuple(data["ignored"]),
        )

    def observation_search(
        self, transaction_time: datetime, page_size: int
    ) -> ObservationSearch:
        """Build the first page's search: filters, store order, lastUpdated window."""
        if self.type_filter is None:
            found = ObservationSearch()
        else:
            found = search.parse_observation_search(parse_qsl(self.type_filter))
        found.sort = Sort.STORE
        found.count = page_size
        found.cursor = None
        # Nothing stored after transactionTime, everything up to it (IG).
        until = transaction_time if self.until is None else self.until
        until = min(until, transaction_time)
        # "le" keeps column < end, "gt" keeps column >= end: (since, until].
        found.last_updated.append(
            DateFilter("le", DateRange(until, until + _ONE_MICROSECOND))
        )
        if self.since is not None:
            found.last_updated.append(
                DateFilter("gt", DateRange(self.since, self.since + _ONE_MICROSECOND))
            )
        return found


def parse_instant(name: str, text: str) -> datetime:
    """Parse a FHIR ``instant`` (seconds and zone required) into aware UTC."""
    # An unescaped "+" in a query string arrives as a space.
    text = text.strip().replace(" ", "+")
    if not _INSTANT_RE.match(text):
        raise FhirError(
            400, "invalid", f"{name} must be a FHIR instant like 2026-11-02T08:00:00Z"
        )
    return search.parse_date(text).start


def _single(pairs: Sequence[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in pairs if n == name]
    if len(values) > 1:
        raise FhirError(400, "invalid", f"{name} may be given once")
    return values[0] if values else None


def _type_filters(raw_query: str) -> list[str]:
    """Return the ``_typeFilter`` queries, split on the raw (still encoded) commas.

    Clients URL-encode each query and join them with ``,`` (IG), so a comma inside
    a query (``code=a,b``) is only told apart before decoding.
    """
    queries: list[str] = []
    for part in raw_query.split("&"):
        name, _, value = part.partition("=")
        if unquote_plus(name) == "_typeFilter":
            queries.extend(unquote_plus(q) for q in value.split(",") if q)
    return queries


def _parse_type_filter(query: str) -> str:
    """Check one ``Observation?...`` query; return its normalised query string."""
    pairs = parse_qsl(query, keep_blank_values=True)
    try:
        checked = search.check_names(
            pairs, tuple(search.OBSERVATION_PARAMS), lenient=False
        )
        search.parse_observation_search(checked)
    except FhirError as exc:
        raise FhirError(400, exc.code, f"_typeFilter: {exc.message}") from exc
    return urlencode(checked)


def parse_kickoff(
    pairs: Sequence[tuple[str, str]], raw_query: str, *, lenient: bool
) -> ExportRequest:
    """Check the kick-off parameters; :class:`FhirError` (400) for what we cannot do."""
    ignored: list[str] = []
    for name, _ in pairs:
        if name not in KICKOFF_PARAMS:
            if not lenient:
                raise FhirError(
                    400, "not-supported", f"unsupported $export parameter {name!r}"
                )
            ignored.append(f"parameter {name!r} is not supported and was ignored")

    output_format = _single(pairs, "_outputFormat")
    # application/fhir+ndjson unescaped in a query string reads "fhir ndjson".
    if (
        output_format is not None
        and output_format.strip().replace(" ", "+") not in OUTPUT_FORMATS
    ):
        raise FhirError(
            400,
            "not-supported",
            f"_outputFormat must be one of {', '.join(sorted(OUTPUT_FORMATS))}",
        )

    types = {t.strip() for n, v in pairs if n == "_type" for t in v.split(",")}
    types.discard("")
    unsupported = sorted(types.difference(EXPORTABLE_TYPES))
    if unsupported:
        message = f"only Observation can be exported, not {', '.join(unsupported)}"
        if not lenient:
            raise FhirError(400, "not-supported", message)
        ignored.append(message)
    nothing = bool(types) and not types.intersection(EXPORTABLE_TYPES)

    since_text, until_text = _single(pairs, "_since"), _single(pairs, "_until")
    since = None if since_text is None else parse_instant("_since", since_text)
    until = None if until_text is None else parse_instant("_until", until_text)
    if since is not None and until is not None and until <= since:
        raise FhirError(400, "invalid", "_until must be later than _since")

    type_filter = None
    queries: list[str] = []
    for query in _type_filters(raw_query):
        kind, question, rest = query.partition("?")
        if kind not in EXPORTABLE_TYPES or not question:
            message = f"_typeFilter {query[:60]!r} is not an Observation search"
            if not lenient:
                raise FhirError(400, "not-supported", message)
            ignored.append(message)
            continue
        queries.append(_parse_type_filter(rest))
    if len(queries) > 1:
        # TODO: OR several _typeFilter queries once a job may run one search per
        # query without exporting a reading twice.
        raise FhirError(400, "not-supported", "only one _typeFilter query is supported")
    if queries:
        type_filter = queries[0]
    return ExportRequest(since, until, type_filter, nothing, tuple(ignored))


# -- job table -----------------------------------------------------------------

_j = cast(Table, ExportJob.__table__)


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One finished file of a job: its resource type, name and line count."""

    type: str
    name: str
    count: int


@dataclass(slots=True)
class Job:
    """A row of ``export_jobs``."""

    id: str
    owner: str
    status: str
    request_url: str
    parameters: str
    transaction_time: datetime
    updated_at: datetime
    expires_at: datetime | None
    exported: int
    total: int | None
    output: list[OutputFile] = field(default_factory=list)
    error: str | None = None


def _job(row: Any) -> Job:
    files = [OutputFile(**f) for f in json.loads(row.output)] if row.output else []
    return Job(
        id=row.id,
        owner=row.owner,
        status=row.status,
        request_url=row.request_url,
        parameters=row.parameters,
        transaction_time=utc(row.transaction_time),
        updated_at=utc(row.updated_at),
        expires_at=None if row.expires_at is None else utc(row.expires_at),
        exported=row.exported,
        total=row.total,
        output=files,
        error=row.error,
    )


class JobStore:
    """The ``export_jobs`` rows; SQL errors become :class:`StoreError`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        job_id: str,
        owner: str,
        request_url: str,
        parsed: ExportRequest,
        now: datetime,
        max_active: int,
    ) -> bool:
        """Insert a queued job unless ``owner`` already has ``max_active`` of them."""
        # TODO: two simultaneous kick-offs of one client on PostgreSQL may both
        # pass this count (read committed); a per-owner lock row would close that.
        active = (
            select(func.count())
            .select_from(_j)
            .where(_j.c.owner == owner, _j.c.status.in_(ACTIVE))
        )
        try:
            with self.engine.begin() as conn:
                if conn.execute(active).scalar_one() >= max_active:
                    return False
                conn.execute(
                    _j.insert().values(
                        id=job_id,
                        owner=owner,
                        status=ACCEPTED,
                        request_url=request_url,
                        parameters=parsed.to_json(),
                        transaction_time=now,
                        created_at=now,
                        updated_at=now,
                        exported=0,
                    )
                )
        except SQLAlchemyError as exc:
            raise StoreError(f"export job insert failed: {type(exc).__name__}") from exc
        return True

    def get(self, job_id: str) -> Job | None:
        """Return the job, if it exists."""
        try:
            with self.engine.connect() as conn:
                row = conn.execute(select(_j).where(_j.c.id == job_id)).first()
        except SQLAlchemyError as exc:
            raise StoreError(f"export job read failed: {type(exc).__name__}") from exc
        return None if row is None else _job(row)

    def _update(self, where: Iterable[Any], **values: Any) -> int:
        try:
            with self.engine.begin() as conn:
                result = conn.execute(update(_j).where(*where).values(**values))
        except SQLAlchemyError as exc:
            raise StoreError(f"export job update failed: {type(exc).__name__}") from exc
        return int(result.rowcount)

    def start(self, job_id: str, now: datetime) -> bool:
        """Mark a queued job running; False if it was cancelled meanwhile."""
        where = (_j.c.id == job_id, _j.c.status == ACCEPTED)
        return self._update(where, status=RUNNING, updated_at=now) == 1

    def progress(
        self, job_id: str, exported: int, total: int | None, now: datetime
    ) -> bool:
        """Record progress; False when the job is gone (cancelled elsewhere)."""
        where = (_j.c.id == job_id, _j.c.status == RUNNING)
        values = {"exported": exported, "total": total, "updated_at": now}
        return self._update(where, **values) == 1

    def complete(
        self,
        job_id: str,
        files: list[OutputFile],
        exported: int,
        now: datetime,
        expires_at: datetime,
    ) -> bool:
        """Mark the job done with its files; False when it was cancelled meanwhile."""
        output = json.dumps(
            [{"type": f.type, "name": f.name, "count": f.count} for f in files]
        )
        where = (_j.c.id == job_id, _j.c.status == RUNNING)
        values = {
            "status": COMPLETED,
            "output": output,
            "exported": exported,
            "total": exported,
            "updated_at": now,
            "expires_at": expires_at,
        }
        return self._update(where, **values) == 1

    def fail(
        self, job_ids: Sequence[str], message: str, now: datetime, expires_at: datetime
    ) -> int:
        """Mark queued or running jobs failed with a message the client sees."""
        if not job_ids:
            return 0
        where = (_j.c.id.in_(list(job_ids)), _j.c.status.in_(ACTIVE))
        values = {
            "status": FAILED,
            "error": message[:500],
            "updated_at": now,
            "expires_at": expires_at,
        }
        return self._update(where, **values)

    def fail_stale(
        self, cutoff: datetime, keep: Sequence[str], now: datetime, expires_at: datetime
    ) -> int:
        """Fail active jobs untouched since ``cutoff`` that are not in ``keep``."""
        # TODO: resume from the last finished file instead (the keyset cursor and
        # the file list would have to be saved with each progress update).
        where = [_j.c.status.in_(ACTIVE), _j.c.updated_at < cutoff]
        if keep:
            where.append(_j.c.id.not_in(list(keep)))
        values = {
            "status": FAILED,
            "error": "export interrupted (its server stopped); start a new export",
            "updated_at": now,
            "expires_at": expires_at,
        }
        return self._update(where, **values)

    def touch(self, job_ids: Sequence[str], now: datetime) -> None:
        """Show that this process still works on ``job_ids``."""
        if job_ids:
            where = (_j.c.id.in_(list(job_ids)), _j.c.status.in_(ACTIVE))
            self._update(where, updated_at=now)

    def delete(self, job_ids: Sequence[str]) -> int:
        """Delete jobs; return how many existed."""
        if not job_ids:
            return 0
        try:
            with self.engine.begin() as conn:
                result = conn.execute(delete(_j).where(_j.c.id.in_(list(job_ids))))
        except SQLAlchemyError as exc:
            raise StoreError(f"export job delete failed: {type(exc).__name__}") from exc
        return int(result.rowcount)

    def expired(self, now: datetime) -> list[str]:
        """Return the ids of jobs past their expiry."""
        query = select(_j.c.id).where(_j.c.expires_at < now)
        return self._ids(query)

    def ids(self) -> set[str]:
        """Return every job id."""
        return set(self._ids(select(_j.c.id)))

    def _ids(self, query: Any) -> list[str]:
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(query).scalars())
        except SQLAlchemyError as exc:
            raise StoreError(f"export job query failed: {type(exc).__name__}") from exc


# -- files ---------------------------------------------------------------------


class NdjsonFiles:
    """The NDJSON files of one resource type in a job directory, split by count.

    A file is written as ``<name>.part`` and renamed when full or closed, so a
    listed file is always complete.
    """

    def __init__(self, directory: Path, resource_type: str, max_per_file: int) -> None:
        self.directory = directory
        self.resource_type = resource_type
        self.max_per_file = max_per_file
        self.files: list[OutputFile] = []
        self._handle: IO[bytes] | None = None
        self._name = ""
        self._count = 0

    def write(self, lines: Sequence[bytes]) -> None:
        """Append one resource per line, opening new files as they fill up."""
        start = 0
        while start < len(lines):
            if self._handle is None:
                self._open()
            assert self._handle is not None
            room = self.max_per_file - self._count
            chunk = lines[start : start + room]
            self._handle.write(b"\n".join(chunk) + b"\n")
            self._count += len(chunk)
            start += len(chunk)
            if self._count >= self.max_per_file:
                self._finish()

    def close(self) -> list[OutputFile]:
        """Finish the open file and return every file written."""
        if self._handle is not None:
            self._finish()
        return self.files

    def discard(self) -> None:
        """Close without finishing (the job is cancelled or failed)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _open(self) -> None:
        self._name = f"{self.resource_type}-{len(self.files) + 1:04d}.ndjson"
        self._handle = (self.directory / f"{self._name}.part").open("wb")
        self._count = 0

    def _finish(self) -> None:
        assert self._handle is not None
        self._handle.close()
        self._handle = None
        part = self.directory / f"{self._name}.part"
        part.rename(self.directory / self._name)
        self.files.append(OutputFile(self.resource_type, self._name, self._count))


def _encode(resource: mapping.JsonDict) -> bytes:
    return orjson.dumps(resource)


@dataclass(frozen=True, slots=True)
class PageResult:
    """What one exported page did."""

    count: int
    more: bool
    total: int | None
    last_id: int


# -- the service ---------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


class ExportService:
    """Accepts export jobs, runs them in the background, expires them."""

    def __init__(self, settings: ExportSettings, engine: Engine) -> None:
        self.settings = settings
        self.jobs = JobStore(engine)
        self._queries = FhirQueries(engine)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        self._started: set[str] = set()  # holding a slot: may be writing a page
        self._slots = asyncio.Semaphore(settings.max_running_jobs)
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def retention(self) -> timedelta:
        """How long finished and failed jobs are kept."""
        return timedelta(seconds=self.settings.retention_seconds)

    def directory(self, job_id: str) -> Path:
        """Return the directory of a job's files."""
        return self.settings.directory / job_id

    async def start(self) -> None:
        """Create the export directory and start the sweeper."""
        await asyncio.to_thread(
            self.settings.directory.mkdir, parents=True, exist_ok=True
        )
        self._sweeper = asyncio.create_task(
            self._sweep_periodically(), name="fhir-export[sweeper]"
        )

    async def stop(self) -> None:
        """Stop the sweeper and the running jobs; mark the interrupted jobs failed."""
        interrupted = list(self._tasks)
        tasks = [*self._tasks.values()]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if interrupted:
            now = _now()
            message = "export interrupted by a server shutdown; start a new export"
            try:
                await asyncio.to_thread(
                    self.jobs.fail, interrupted, message, now, now + self.retention
                )
            except StoreError:
                log.warning("could not mark %d interrupted exports", len(interrupted))

    def is_local(self, job_id: str) -> bool:
        """Tell whether this process runs ``job_id``."""
        return job_id in self._tasks

    async def submit(
        self, owner: str, request_url: str, parsed: ExportRequest
    ) -> str | None:
        """Queue a job and start it; None when ``owner`` has too many already."""
        job_id = uuid.uuid4().hex
        created = await asyncio.to_thread(
            self.jobs.create,
            job_id,
            owner,
            request_url,
            parsed,
            _now(),
            self.settings.max_jobs_per_client,
        )
        if not created:
            return None
        self._tasks[job_id] = asyncio.create_task(
            self._run(job_id), name=f"fhir-export[{job_id[:8]}]"
        )
        log.info("export %s accepted", job_id)
        return job_id

    async def cancel(self, job_id: str) -> None:
        """Delete a job, stop it if it runs here, and delete its files."""
        await asyncio.to_thread(self.jobs.delete, [job_id])
        task = self._tasks.get(job_id)
        if task is not None and job_id not in self._started:
            task.cancel()  # still queued for a slot: nothing written yet
        elif task is not None:
            # The task stops after its current page; waiting keeps its thread from
            # writing into the directory removed below.
            self._cancelled.add(job_id)
            try:
                await asyncio.wait_for(asyncio.shield(task), CANCEL_WAIT_SECONDS)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        await asyncio.to_thread(shutil.rmtree, self.directory(job_id), True)
        log.info("export %s deleted", job_id)

    async def fail_if_stale(self, job: Job) -> Job:
        """Mark ``job`` failed if its process is gone; return it as it is now."""
        if job.status not in ACTIVE or self.is_local(job.id):
            return job
        now = _now()
        cutoff = now - timedelta(seconds=self.settings.stale_after_seconds)
        if job.updated_at >= cutoff:
            return job
        await asyncio.to_thread(
            self.jobs.fail_stale, cutoff, list(self._tasks), now, now + self.retention
        )
        return await asyncio.to_thread(self.jobs.get, job.id) or job

    # -- running a job -------------------------------------------------------

    async def _run(self, job_id: str) -> None:
        try:
            async with self._slots:
                self._started.add(job_id)
                await self._export(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("export %s failed", job_id)
            now = _now()
            try:
                await asyncio.to_thread(
                    self.jobs.fail,
                    [job_id],
                    "export failed on the server; start a new export",
                    now,
                    now + self.retention,
                )
            except StoreError:
                log.warning("export %s: could not record the failure", job_id)
            await asyncio.to_thread(shutil.rmtree, self.directory(job_id), True)
        finally:
            self._tasks.pop(job_id, None)
            self._cancelled.discard(job_id)
            self._started.discard(job_id)

    async def _export(self, job_id: str) -> None:
        job = await asyncio.to_thread(self.jobs.get, job_id)
        if job is None or not await asyncio.to_thread(self.jobs.start, job_id, _now()):
            return
        parsed = ExportRequest.from_json(job.parameters)
        directory = self.directory(job_id)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        files = NdjsonFiles(
            directory, "Observation", self.settings.max_resources_per_file
        )
        try:
            exported = 0
            if not parsed.nothing:
                exported = await self._write_pages(job, parsed, files)
                if exported < 0:  # cancelled, here or by another process
                    files.discard()
                    await asyncio.to_thread(shutil.rmtree, directory, True)
                    return
            output = await asyncio.to_thread(files.close)
            errors = await asyncio.to_thread(self._write_errors, directory, parsed)
        finally:
            files.discard()

        now = _now()
        done = await asyncio.to_thread(
            self.jobs.complete,
            job_id,
            output + errors,
            exported,
            now,
            now + self.retention,
        )
        if not done:  # deleted meanwhile by another process
            await asyncio.to_thread(shutil.rmtree, directory, True)
            return
        log.info(
            "export %s completed: %d resources in %d files",
            job_id,
            exported,
            len(output),
        )

    async def _write_pages(
        self, job: Job, parsed: ExportRequest, files: NdjsonFiles
    ) -> int:
        """Export every page; return the count, or -1 when the job was cancelled."""
        # TODO: PostgreSQL hands out ids before commit, so a reading committed
        # after this job passed its id is missed although stored before
        # transactionTime; wait for in-flight commits (or page by received_at)
        # if concurrent ingest at kick-off time must be exported exactly.
        query = parsed.observation_search(job.transaction_time, self.settings.page_size)
        query.total = True  # counted with the first page, for X-Progress
        exported = 0
        total: int | None = None
        touched = time.monotonic()
        while True:
            if job.id in self._cancelled:
                return -1
            page = await asyncio.to_thread(self._page, query, files)
            exported += page.count
            if page.total is not None and total is None:
                total = page.total
            query.total = False
            if not page.more:
                return exported
            query.cursor = ("", page.last_id)
            if time.monotonic() - touched >= PROGRESS_INTERVAL_SECONDS:
                if not await asyncio.to_thread(
                    self.jobs.progress, job.id, exported, total, _now()
                ):
                    return -1  # deleted by another process
                touched = time.monotonic()

    def _page(self, query: ObservationSearch, files: NdjsonFiles) -> PageResult:
        """Read, map and write one page (in a worker thread)."""
        page = self._queries.search_observations(query)
        files.write(
            [_encode(mapping.observation(r.reading, r.patient_ref)) for r in page.rows]
        )
        last_id = page.rows[-1].reading.id if page.rows else 0
        return PageResult(len(page.rows), page.more, page.total, last_id)

    def _write_errors(self, directory: Path, parsed: ExportRequest) -> list[OutputFile]:
        if not parsed.ignored:
            return []
        files = NdjsonFiles(
            directory, "OperationOutcome", self.settings.max_resources_per_file
        )
        files.write(
            [
                _encode(mapping.operation_outcome("not-supported", text, "warning"))
                for text in parsed.ignored
            ]
        )
        return files.close()

    # -- housekeeping ----------------------------------------------------------

    async def _sweep_periodically(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep, list(self._tasks), _now())
            except StoreError as exc:
                log.warning("export sweep failed: %s", exc)
            except OSError as exc:
                log.warning("export sweep could not remove files: %s", exc.strerror)
            await asyncio.sleep(self.settings.sweep_interval_seconds)

    def sweep(self, local: list[str], now: datetime) -> None:
        """Touch ``local`` jobs, fail stale ones, delete expired jobs and files."""
        self.jobs.touch(local, now)
        cutoff = now - timedelta(seconds=self.settings.stale_after_seconds)
        failed = self.jobs.fail_stale(cutoff, local, now, now + self.retention)
        if failed:
            log.warning("marked %d interrupted exports failed", failed)
        expired = self.jobs.expired(now)
        if expired:
            self.jobs.delete(expired)
            log.info("deleted %d expired exports", len(expired))
        # Directories first, rows second: a job's row exists before its directory,
        # so a directory without a row belongs to a deleted job.
        root = self.settings.directory
        found = [p for p in root.iterdir() if p.is_dir() and _JOB_ID_RE.match(p.name)]
        if found:
            known = self.jobs.ids()
            for path in found:
                if path.name not in known:
                    shutil.rmtree(path, ignore_errors=True)


# -- routes --------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run the export service beside the bridge (which migrated the database)."""
    bridge = app.state.bridge
    service = ExportService(bridge.settings.export, bridge.store.engine)
    app.state.fhir_export = service
    await service.start()
    try:
        yield
    finally:
        await service.stop()


router = APIRouter(prefix="/fhir", tags=["fhir"], route_class=FhirRoute)
GuardDep = Annotated[Principal | None, Depends(fhir_guard)]


def _service(request: Request) -> ExportService:
    service: ExportService = request.app.state.fhir_export
    return service


def _authorised(principal: Principal | None) -> Principal:
    # fhir_guard lets system-level operations through with any valid token.
    if principal is None or not principal.allows(SCOPE):
        raise AuthError(403, "insufficient_scope", f"requires scope {SCOPE}")
    return principal


def _base(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}/fhir"


def _prefer(request: Request) -> set[str]:
    header = request.headers.get("prefer", "")
    return {p.strip().lower() for p in re.split(r"[,;]", header) if p.strip()}


async def _owned_job(request: Request, principal: Principal, job_id: str) -> Job:
    """Return the caller's job; 404 for unknown ids and other clients' jobs alike."""
    job = None
    if _JOB_ID_RE.match(job_id):
        job = await asyncio.to_thread(_service(request).jobs.get, job_id)
    if job is None or job.owner != principal.subject:
        raise FhirError(404, "not-found", "no such export")
    return job


@router.get("/$export")
async def export_kickoff(request: Request, principal: GuardDep) -> Response:
    """Start a Bulk Data export of Observations (asynchronous: Prefer respond-async)."""
    caller = _authorised(principal)
    prefer = _prefer(request)
    if "respond-async" not in prefer:
        raise FhirError(
            400, "invalid", "$export needs the header 'Prefer: respond-async'"
        )
    parsed = parse_kickoff(
        request.query_params.multi_items(),
        request.url.query,
        lenient="handling=lenient" in prefer,
    )

    service = _service(request)
    job_id = await service.submit(caller.subject, str(request.url), parsed)
    if job_id is None:
        response = outcome_response(
            429,
            "throttled",
            f"at most {service.settings.max_jobs_per_client} exports may run at once; "
            "wait for one to finish or delete one",
        )
        response.headers["Retry-After"] = str(service.settings.retry_after_seconds)
        return response
    outcome = mapping.operation_outcome(
        "informational", "export accepted; poll Content-Location", "information"
    )
    location = f"{_base(request)}/{STATUS_PATH}/{job_id}"
    return FhirResponse(
        outcome, status_code=202, headers={"Content-Location": location}
    )


@router.get(f"/{STATUS_PATH}/{{job_id}}")
async def export_status(job_id: str, request: Request, principal: GuardDep) -> Response:
    """Report an export: 202 while it runs, the manifest when done, 500 if it failed."""
    caller = _authorised(principal)
    service = _service(request)
    job = await service.fail_if_stale(await _owned_job(request, caller, job_id))

    if job.status in ACTIVE:
        if job.status == ACCEPTED:
            progress = "queued"
        elif job.total:
            percent = min(99, 100 * job.exported // job.total)
            progress = f"{percent}% ({job.exported} of {job.total} resources)"
        else:
            progress = f"in progress ({job.exported} resources)"
        headers = {
            "X-Progress": progress,
            "Retry-After": str(service.settings.retry_after_seconds),
        }
        return Response(status_code=202, headers=headers)
    if job.status == FAILED:
        return outcome_response(500, "exception", job.error or "export failed")

    base = _base(request)

    def item(f: OutputFile) -> dict[str, Any]:
        url = f"{base}/{FILE_PATH}/{job.id}/{f.name}"
        return {"type": f.type, "url": url, "count": f.count}

    manifest = {
        "transactionTime": mapping.instant(job.transaction_time),
        "request": job.request_url,
        "requiresAccessToken": True,
        "output": [item(f) for f in job.output if f.type != "OperationOutcome"],
        "error": [item(f) for f in job.output if f.type == "OperationOutcome"],
    }
    headers = {}
    if job.expires_at is not None:
        headers["Expires"] = format_datetime(job.expires_at, usegmt=True)
    return JSONResponse(manifest, headers=headers)


@router.delete(f"/{STATUS_PATH}/{{job_id}}")
async def export_delete(job_id: str, request: Request, principal: GuardDep) -> Response:
    """Cancel an export, or delete a finished one's files; then its status is 404."""
    caller = _authorised(principal)
    job = await _owned_job(request, caller, job_id)
    await _service(request).cancel(job.id)
    outcome = mapping.operation_outcome(
        "informational", "export deleted", "information"
    )
    return FhirResponse(outcome, status_code=202)


@router.get(f"/{FILE_PATH}/{{job_id}}/{{name}}")
async def export_file(
    job_id: str, name: str, request: Request, principal: GuardDep
) -> Response:
    """Download one NDJSON file of a finished export."""
    caller = _authorised(principal)
    job = await _owned_job(request, caller, job_id)
    # Only names the manifest lists: no path ever comes from the client.
    listed = {f.name for f in job.output} if job.status == COMPLETED else set()
    if name not in listed:
        raise FhirError(404, "not-found", "no such export file")
    path = _service(request).directory(job.id) / name
    if not await asyncio.to_thread(path.is_file):
        raise FhirError(404, "not-found", "export file expired")
    return FileResponse(path, media_type=NDJSON)


__all__ = [
    "ExportRequest",
    "ExportService",
    "lifespan",
    "parse_instant",
    "parse_kickoff",
    "router",
]
