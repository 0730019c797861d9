"""MQTT 3.1.1 and 5 packets: the subset a long-lived QoS 1 subscriber needs.

Pure functions over bytes, no I/O, so the parsers can be tested on their own. The
reader splits a byte stream into packets however the stream was chunked; the
decoders raise :class:`ProtocolError` on anything malformed and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

V311: Final = 4  # protocol levels as sent in CONNECT
V5: Final = 5
MAX_REMAINING_LENGTH: Final = 268_435_455  # four varint bytes

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class ProtocolError(ValueError):
    """A packet that breaks the MQTT specification."""


class PacketType(IntEnum):
    """Control packet types (the high nibble of the first byte)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class Prop(IntEnum):
    """MQTT 5 property identifiers used here (the rest are skipped by type)."""

    SESSION_EXPIRY_INTERVAL = 0x11
    SERVER_KEEP_ALIVE = 0x13
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21


# Every MQTT 5 property's wire type, so that unknown-to-us ones can be skipped.
_BYTE, _U16_T, _U32_T, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES: Final = {
    0x01: _BYTE,
    0x02: _U32_T,
    0x03: _STRING,
    0x08: _STRING,
    0x09: _BINARY,
    0x0B: _VARINT,
    0x11: _U32_T,
    0x12: _STRING,
    0x13: _U16_T,
    0x15: _STRING,
    0x16: _BINARY,
    0x17: _BYTE,
    0x18: _U32_T,
    0x19: _BYTE,
    0x1A: _STRING,
    0x1C: _STRING,
    0x1F: _STRING,
    0x21: _U16_T,
    0x22: _U16_T,
    0x23: _U16_T,
    0x24: _BYTE,
    0x25: _BYTE,
    0x26: _PAIR,
    0x27: _U32_T,
    0x28: _BYTE,
    0x29: _BYTE,
    0x2A: _BYTE,
}


# -- primitives -------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Encode a variable byte integer (remaining length, property length)."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def decode_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """Decode a variable byte integer at ``pos``: (value, next position).

    ``None`` means the data ends inside it; more than four bytes is an error.
    """
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= len(data):
            return None
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise ProtocolError("variable byte integer longer than four bytes")


def _string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return _U16.pack(len(raw)) + raw


def _binary(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("binary field longer than 65,535 bytes")
    return _U16.pack(len(value)) + value


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def _need(body: bytes, end: int, what: str) -> None:
    if end > len(body):
        raise ProtocolError(f"{what} runs past the end of the packet")


def _read_u16(body: bytes, pos: int, what: str) -> int:
    _need(body, pos + 2, what)
    value: int = _U16.unpack_from(body, pos)[0]
    return value


def _read_string(body: bytes, pos: int, what: str) -> tuple[str, int]:
    length = _read_u16(body, pos, what)
    end = pos + 2 + length
    _need(body, end, what)
    try:
        return body[pos + 2 : end].decode(), end
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not UTF-8") from exc


# -- properties -------------------------------------------------------------------


def decode_properties(
    body: bytes, pos: int
) -> tuple[dict[int, int | str | bytes], int]:
    """Read an MQTT 5 property block at ``pos``: ({identifier: value}, next position).

    User properties (the only repeatable kind) are read and dropped.
    """
    decoded = decode_varint(body, pos)
    if decoded is None:
        raise ProtocolError("property length runs past the end of the packet")
    length, pos = decoded
    end = pos + length
    _need(body, end, "property block")
    props: dict[int, int | str | bytes] = {}
    while pos < end:
        ident = body[pos]
        pos += 1
        kind = _PROPERTY_TYPES.get(ident)
        value: int | str | bytes
        if kind is None:
            raise ProtocolError(f"unknown property 0x{ident:02x}")
        if kind == _BYTE:
            _need(body, pos + 1, "property")
            value, pos = body[pos], pos + 1
        elif kind == _U16_T:
            value, pos = _read_u16(body, pos, "property"), pos + 2
        elif kind == _U32_T:
            _need(body, pos + 4, "property")
            value, pos = _U32.unpack_from(body, pos)[0], pos + 4
        elif kind == _VARINT:
            got = decode_varint(body, pos)
            if got is None:
                raise ProtocolError("property runs past the end of the packet")
            value, pos = got
        elif kind == _STRING:
            value, pos = _read_string(body, pos, "property")
        elif kind == _BINARY:
            size = _read_u16(body, pos, "property")
            _need(body, pos + 2 + size, "property")
            value, pos = body[pos + 2 : pos + 2 + size], pos + 2 + size
        else:  # a user property: two strings
            _, pos = _read_string(body, pos, "user property")
            _, pos = _read_string(body, pos, "user property")
            continue
        props[ident] = value
    if pos != end:
        raise ProtocolError("a property runs past its block")
    return props, end


def _skip_properties(body: bytes, pos: int) -> int:
    decoded = decode_varint(body, pos)
    if decoded is None:
        raise ProtocolError("property length runs past the end of the packet")
    length, pos = decoded
    _need(body, pos + length, "property block")
    return pos + length


def _encode_properties(props: dict[Prop, int]) -> bytes:
    out = bytearray()
    for ident, value in props.items():
        out.append(ident)
        kind = _PROPERTY_TYPES[ident]
        out += _U16.pack(value) if kind == _U16_T else _U32.pack(value)
    return encode_varint(len(out)) + bytes(out)


# -- the stream -------------------------------------------------------------------


class PacketReader:
    """Split a byte stream into (first byte, body) packets, whatever the chunking."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Take the next chunk; return every packet it completes, in order."""
        buf = self._buf
        buf += data
        packets = []
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            header = decode_varint(buf, pos + 1)
            if header is None:
                break
            length, start = header
            end = start + length
            if end > size:
                break
            packets.append((buf[pos], bytes(buf[start:end])))
            pos = end
        if pos:
            del buf[:pos]
        return packets

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a packet."""
        return len(self._buf)


# -- what we send -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE."""

    topic_filter: str
    qos: int = 1
    no_local: bool = False  # MQTT 5 only: do not send us our own publishes


def connect(
    client_id: str,
    *,
    version: int,
    keepalive: int,
    clean_start: bool,
    username: str | None = None,
    password: str | None = None,
    session_expiry: int = 0,
    receive_maximum: int = 0,
) -> bytes:
    """Encode CONNECT; MQTT 5 carries the session expiry and the Receive Maximum.

    The Receive Maximum bounds how many QoS 1 messages the broker leaves
    unacknowledged with us, which is the client's only flow control.
    """
    flags = 0x02 if clean_start else 0
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _binary(password.encode())
    body = _string("MQTT") + bytes((version, flags)) + _U16.pack(keepalive)
    if version == V5:
        props: dict[Prop, int] = {}
        if session_expiry:
            props[Prop.SESSION_EXPIRY_INTERVAL] = session_expiry
        if receive_maximum:
            props[Prop.RECEIVE_MAXIMUM] = min(receive_maximum, 0xFFFF)
        body += _encode_properties(props)
    return _packet(0x10, body + payload)


def subscribe(mid: int, subscriptions: list[Subscription], *, version: int) -> bytes:
    """Encode SUBSCRIBE (No Local is an MQTT 5 option and is dropped on 3.1.1)."""
    body = bytearray(_U16.pack(mid))
    if version == V5:
        body.append(0)  # no properties
    for sub in subscriptions:
        body += _string(sub.topic_filter)
        options = sub.qos
        if version == V5 and sub.no_local:
            options |= 0x04
        body.append(options)
    return _packet(0x82, bytes(body))


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    retain: bool,
    mid: int,
    version: int,
    dup: bool = False,
) -> bytes:
    """Encode PUBLISH; ``mid`` is ignored at QoS 0."""
    first = 0x30 | qos << 1 | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = _string(topic)
    if qos:
        body += _U16.pack(mid)
    if version == V5:
        body += b"\x00"
    return _packet(first, body + payload)


def puback(mid: int) -> bytes:
    """Encode PUBACK with success (the short form both versions accept)."""
    return b"\x40\x02" + _U16.pack(mid)


PINGREQ: Final = b"\xc0\x00"
DISCONNECT: Final = b"\xe0\x00"  # MQTT 5 reads an empty body as "normal disconnection"


def with_dup(packet: bytes) -> bytes:
    """Return a QoS 1 PUBLISH with its DUP flag set, for a retransmission."""
    return bytes((packet[0] | 0x08,)) + packet[1:]


# -- what we receive --------------------------------------------------------------


@dataclass(slots=True)  # one per message received: frozen would cost 5x to build
class Publish:
    """An incoming PUBLISH."""

    topic: str
    payload: bytes
    qos: int
    mid: int  # 0 at QoS 0
    retain: bool
    dup: bool


def decode_publish(first_byte: int, body: bytes, *, version: int) -> Publish:
    """Decode a PUBLISH; a topic alias (never asked for) is a protocol error."""
    qos = (first_byte >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    topic, pos = _read_string(body, 0, "topic")
    mid = 0
    if qos:
        mid = _read_u16(body, pos, "packet identifier")
        pos += 2
        if mid == 0:
            raise ProtocolError("packet identifier 0")
    if version == V5:
        pos = _skip_properties(body, pos)
    if not topic:
        raise ProtocolError("PUBLISH without a topic name")
    return Publish(
        topic,
        body[pos:],
        qos,
        mid,
        bool(first_byte & 0x01),
        bool(first_byte & 0x08),
    )


@dataclass(frozen=True, slots=True)
class Connack:
    """The broker's answer to CONNECT."""

    session_present: bool
    code: int  # 0 accepted; otherwise a 3.1.1 return code or an MQTT 5 reason
    properties: dict[int, int | str | bytes]


def decode_connack(body: bytes, *, version: int) -> Connack:
    """Decode CONNACK."""
    _need(body, 2, "CONNACK")
    props: dict[int, int | str | bytes] = {}
    if version == V5 and len(body) > 2:
        props, _ = decode_properties(body, 2)
    return Connack(bool(body[0] & 0x01), body[1], props)


def decode_suback(body: bytes, *, version: int) -> tuple[int, list[int]]:
    """Decode SUBACK: (packet identifier, one granted QoS or failure code per filter)."""
    mid = _read_u16(body, 0, "SUBACK")
    pos = 2
    if version == V5:
        pos = _skip_properties(body, pos)
    return mid, list(body[pos:])


def decode_ack(body: bytes) -> tuple[int, int]:
    """Decode PUBACK (or UNSUBACK's identifier): (packet identifier, reason code)."""
    mid = _read_u16(body, 0, "acknowledgement")
    return mid, body[2] if len(body) > 2 else 0


def decode_disconnect(body: bytes) -> tuple[int, str | None]:
    """Decode an MQTT 5 DISCONNECT from the broker: (reason code, reason string)."""
    if not body:
        return 0, None
    reason = None
    if len(body) > 1:
        props, _ = decode_properties(body, 1)
        text = props.get(Prop.REASON_STRING)
        reason = text if isinstance(text, str) else None
    return body[0], reason
