"""Entity tags and ``If-None-Match`` for the REST reads (RFC 9110 §8.8.3, §13.1.2).

The tag of an answer is a hash of the exact JSON bytes it sends, so it changes
whenever anything in the answer changes (a new reading, a kiosk status change, a
value turning stale, a caller seeing patient references or not) and never while
the answer stays the same. It costs the query the answer needs anyway plus one
BLAKE2b pass over the body; a ``304`` saves the client the transfer and parsing.

Starlette has no ``If-None-Match`` parser (``StaticFiles`` splits on commas, which
breaks tags that contain one, and ignores ``*``), so the grammar is parsed here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

TAG_BYTES = 16
CACHE_CONTROL = "private, no-cache"  # reuse only after revalidation, never shared
VARY = "Authorization"  # what a caller may see depends on its token's scopes

# For the OpenAPI of every route answered by :func:`conditional_json`.
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not Modified: the If-None-Match tag is current."}
}

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text.
# Starlette decodes header bytes as latin-1, so obs-text is U+0080..U+00FF here.
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_OWS = " \t"


@dataclass(frozen=True, slots=True)
class EntityTag:
    """One entity tag: its opaque part (without quotes) and whether it is weak."""

    opaque: str
    weak: bool = False

    def __str__(self) -> str:
        return f'{"W/" if self.weak else ""}"{self.opaque}"'


def parse_if_none_match(value: str) -> list[EntityTag] | Literal["*"] | None:
    """Parse an ``If-None-Match`` value: ``"*"``, a list of tags, or None if invalid.

    Empty list elements are skipped as RFC 9110 §5.6.1 asks of recipients. A value
    that does not follow the grammar is None, and the caller ignores the field.
    """
    text = value.strip(_OWS)
    if text == "*":
        return "*"
    tags: list[EntityTag] = []
    pos, end = 0, len(text)
    while pos < end:
        # Skip separators and the whitespace around them (empty elements included).
        if text[pos] in _OWS or text[pos] == ",":
            pos += 1
            continue
        match = _ENTITY_TAG.match(text, pos)
        if match is None:
            return None
        tags.append(EntityTag(match.group(2), weak=match.group(1) is not None))
        pos = match.end()
        # After a tag only whitespace and then a comma or the end may follow.
        while pos < end and text[pos] in _OWS:
            pos += 1
        if pos < end and text[pos] != ",":
            return None
    return tags


def none_match(header_values: list[str], current: EntityTag) -> bool:
    """Tell whether ``If-None-Match`` fails for ``current`` (weak comparison).

    ``header_values`` are the field's lines; several lines form one list. True means
    the client's copy is current and a GET should be answered with 304.
    """
    if not header_values:
        return False
    parsed = parse_if_none_match(", ".join(header_values))
    if parsed is None:
        return False
    if parsed == "*":
        return True  # a current representation exists: we are about to send it
    return any(tag.opaque == current.opaque for tag in parsed)


def tag_of(body: bytes) -> EntityTag:
    """Compute the strong tag of a response body."""
    digest = hashlib.blake2b(body, digest_size=TAG_BYTES).hexdigest()
    return EntityTag(digest)


def conditional_json(request: Request, content: Any) -> Response:
    """Answer ``content`` (JSON-ready values) with an ETag, or 304 if the client has it."""
    response = JSONResponse(content)
    etag = tag_of(bytes(response.body))
    headers = {"ETag": str(etag), "Cache-Control": CACHE_CONTROL, "Vary": VARY}
    if none_match(request.headers.getlist("if-none-match"), etag):
        # RFC 9110 §15.4.5: the same validator and caching fields as a 200, no body.
        return Response(status_code=304, headers=headers)
    response.headers.update(headers)
    return response
