"""The bridge's MQTT packet codec: round trips, any chunking, and malformed input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.mqtt import codec
from bridge.mqtt.codec import V5, V311, PacketReader, ProtocolError, Subscription

topics = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00+#"),
    min_size=1,
    max_size=80,
)
versions = st.sampled_from([V311, V5])


@given(st.integers(0, codec.MAX_REMAINING_LENGTH))
def test_varint_round_trip(value: int) -> None:
    encoded = codec.encode_varint(value)
    assert 1 <= len(encoded) <= 4
    assert codec.decode_varint(encoded, 0) == (value, len(encoded))
    # Cut short anywhere, it asks for more instead of guessing.
    for cut in range(len(encoded)):
        assert codec.decode_varint(encoded[:cut], 0) is None


def test_varint_limits() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        codec.encode_varint(codec.MAX_REMAINING_LENGTH + 1)
    with pytest.raises(ProtocolError, match="longer than four bytes"):
        codec.decode_varint(b"\xff\xff\xff\xff\x01", 0)


@given(
    st.lists(
        st.tuples(
            st.integers(0x30, 0x3F),
            st.one_of(
                st.binary(max_size=300), st.binary(min_size=16_384, max_size=17_000)
            ),
        ),
        max_size=12,
    ),
    st.lists(st.integers(1, 400), max_size=40),
)
def test_reader_returns_the_packets_whatever_the_chunking(
    packets: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(
        bytes((first,)) + codec.encode_varint(len(body)) + body
        for first, body in packets
    )
    reader = PacketReader()
    got: list[tuple[int, bytes]] = []
    pos = 0
    for size in cuts:
        got += reader.feed(stream[pos : pos + size])
        pos += size
    got += reader.feed(stream[pos:])
    assert got == packets
    assert reader.buffered == 0


@given(
    topics,
    st.binary(max_size=2_000),
    st.sampled_from([0, 1]),
    st.booleans(),
    st.booleans(),
    st.integers(1, 0xFFFF),
    versions,
)
def test_publish_round_trip(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    mid: int,
    version: int,
) -> None:
    packet = codec.publish(
        topic, payload, qos=qos, retain=retain, mid=mid, version=version, dup=dup
    )
    (first, body), *rest = PacketReader().feed(packet)
    assert not rest
    assert first >> 4 == codec.PacketType.PUBLISH
    got = codec.decode_publish(first, body, version=version)
    assert (got.topic, got.payload, got.qos, got.retain, got.dup) == (
        topic,
        payload,
        qos,
        retain,
        dup,
    )
    assert got.mid == (mid if qos else 0)
    if qos:
        assert codec.decode_publish(
            codec.with_dup(packet)[0], body, version=version
        ).dup


def test_publish_with_mqtt5_properties_skips_them() -> None:
    # Message expiry (4 bytes) and a user property, as another client may send.
    props = b"\x02\x00\x00\x00\x3c" + b"\x26\x00\x01k\x00\x01v"
    body = (
        b"\x00\x03a/b" + b"\x00\x07" + codec.encode_varint(len(props)) + props + b"hi"
    )
    got = codec.decode_publish(0x32, body, version=V5)
    assert (got.topic, got.mid, got.payload) == ("a/b", 7, b"hi")


@pytest.mark.parametrize(
    ("first", "body", "message"),
    [
        (0x36, b"\x00\x01a\x00\x01", "QoS 3"),
        (0x32, b"\x00\x05ab", "topic runs past"),
        (0x32, b"\x00\x01a\x00", "packet identifier runs past"),
        (0x32, b"\x00\x01a\x00\x00", "packet identifier 0"),
        (0x30, b"\x00\x00payload", "without a topic"),
        (0x30, b"\x00\x02\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_publish_is_a_protocol_error(
    first: int, body: bytes, message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        codec.decode_publish(first, body, version=V311)


@given(st.integers(0, 255), st.binary(max_size=64), versions)
def test_decoders_raise_only_protocol_errors(
    first: int, body: bytes, version: int
) -> None:
    for decode in (
        lambda: codec.decode_publish(first, body, version=version),
        lambda: codec.decode_connack(body, version=version),
        lambda: codec.decode_suback(body, version=version),
        lambda: codec.decode_ack(body),
        lambda: codec.decode_disconnect(body),
        lambda: codec.decode_properties(body, 0),
    ):
        with contextlib.suppress(ProtocolError):
            decode()


@given(
    st.text(max_size=23),
    st.one_of(st.none(), st.text(max_size=20)),
    st.one_of(st.none(), st.text(max_size=20)),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 70_000),
)
def test_connect_mqtt5_carries_its_fields(
    client_id: str,
    username: str | None,
    password: str | None,
    keepalive: int,
    expiry: int,
    receive_maximum: int,
) -> None:
    packet = codec.connect(
        client_id,
        version=V5,
        keepalive=keepalive,
        clean_start=False,
        username=username,
        password=password,
        session_expiry=expiry,
        receive_maximum=receive_maximum,
    )
    (first, body), *_ = PacketReader().feed(packet)
    assert first == 0x10
    assert body[:7] == b"\x00\x04MQTT\x05"
    flags = body[7]
    assert not flags & 0x02  # the session is kept
    assert bool(flags & 0x80) == (username is not None)
    assert bool(flags & 0x40) == (username is not None and password is not None)
    assert int.from_bytes(body[8:10], "big") == keepalive
    props, pos = codec.decode_properties(body, 10)
    assert props.get(codec.Prop.SESSION_EXPIRY_INTERVAL) == (expiry or None)
    want_max = min(receive_maximum, 0xFFFF) or None
    assert props.get(codec.Prop.RECEIVE_MAXIMUM) == want_max
    length = int.from_bytes(body[pos : pos + 2], "big")
    assert body[pos + 2 : pos + 2 + length].decode() == client_id


def test_connect_3_1_1_has_no_properties() -> None:
    packet = codec.connect("k", version=V311, keepalive=60, clean_start=True)
    assert packet == b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01k"


def test_subscribe_options() -> None:
    subs = [Subscription("a/+", 1, no_local=True), Subscription("b/#", 0)]
    v5 = codec.subscribe(9, subs, version=V5)
    assert v5 == b"\x82\x0f\x00\x09\x00\x00\x03a/+\x05\x00\x03b/#\x00"
    # No Local does not exist in 3.1.1; its bit would be a protocol violation.
    v311 = codec.subscribe(9, subs, version=V311)
    assert v311 == b"\x82\x0e\x00\x09\x00\x03a/+\x01\x00\x03b/#\x00"


def test_acks_and_connack() -> None:
    assert codec.puback(0x1234) == b"\x40\x02\x12\x34"
    assert codec.decode_ack(b"\x12\x34") == (0x1234, 0)
    assert codec.decode_ack(b"\x12\x34\x10") == (0x1234, 0x10)
    connack = codec.decode_connack(b"\x01\x00\x03\x21\x00\x14", version=V5)
    assert connack.session_present
    assert connack.code == 0
    assert connack.properties == {codec.Prop.RECEIVE_MAXIMUM: 20}
    assert codec.decode_suback(b"\x00\x05\x00\x01\x80", version=V5) == (5, [1, 0x80])
    reason = b"\x8b\x06\x1f\x00\x03bye"
    assert codec.decode_disconnect(reason) == (0x8B, "bye")
