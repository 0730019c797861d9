"""If-None-Match parsing and matching (RFC 9110 §8.8.3, §13.1.2), as properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from api.etag import EntityTag, none_match, parse_if_none_match, tag_of

# etagc = %x21 / %x23-7E / obs-text (latin-1 decoded, as Starlette hands it over).
ETAGC = st.sampled_from(
    [chr(c) for c in (0x21, *range(0x23, 0x7F), *range(0x80, 0x100))]
)
TAGS = st.builds(EntityTag, st.text(ETAGC, max_size=12), st.booleans())
OWS = st.text(st.sampled_from(" \t"), max_size=2)


@st.composite
def field_values(draw: st.DrawFn) -> tuple[str, list[EntityTag]]:
    """A list of tags written the ways senders write them, with empty elements."""
    tags = draw(st.lists(TAGS, max_size=6))
    parts = [draw(OWS)]
    for tag in tags:
        parts += [str(tag), draw(OWS), ",", draw(OWS)]
        parts += [",", draw(OWS)] * draw(st.integers(0, 2))  # empty elements
    return "".join(parts), tags


@given(field_values())
def test_parse_returns_the_tags_that_were_written(
    written: tuple[str, list[EntityTag]],
) -> None:
    value, tags = written
    assert parse_if_none_match(value) == tags


@given(field_values(), TAGS)
def test_match_is_weak_comparison_against_any_listed_tag(
    written: tuple[str, list[EntityTag]], current: EntityTag
) -> None:
    value, tags = written
    expected = any(t.opaque == current.opaque for t in tags)
    assert none_match([value], current) is expected
    # The same list split over several field lines means the same.
    lines = [str(t) for t in tags] or [value]
    assert none_match(lines, current) is expected


@given(st.lists(TAGS, min_size=1, max_size=4))
def test_a_listed_tag_always_matches_whether_weak_or_strong(
    tags: list[EntityTag],
) -> None:
    for tag in tags:
        for form in (EntityTag(tag.opaque, weak=False), EntityTag(tag.opaque, True)):
            assert none_match([", ".join(map(str, tags))], form)


@given(OWS, OWS, TAGS)
def test_star_matches_any_current_tag(before: str, after: str, tag: EntityTag) -> None:
    assert parse_if_none_match(f"{before}*{after}") == "*"
    assert none_match([f"{before}*{after}"], tag)


@given(st.text(max_size=40), TAGS)
def test_any_text_parses_or_is_ignored_without_error(
    value: str, current: EntityTag
) -> None:
    parsed = parse_if_none_match(value)
    assert parsed is None or parsed == "*" or isinstance(parsed, list)
    if parsed is None:
        assert none_match([value], current) is False


def test_malformed_values_are_ignored() -> None:
    for value in (
        "abc",  # unquoted
        '"abc',  # unterminated
        'w/"abc"',  # the weak marker is case-sensitive
        '"a" "b"',  # no comma between tags
        '*, "a"',  # "*" stands alone
        '"a"b',
        '"a\x7fb"',  # DEL is no etagc
    ):
        assert parse_if_none_match(value) is None, value
        assert not none_match([value], EntityTag("a"))


def test_commas_inside_a_tag_do_not_split_it() -> None:
    assert parse_if_none_match('"a,b", W/"c"') == [
        EntityTag("a,b"),
        EntityTag("c", weak=True),
    ]
    assert not none_match(['"a,b"'], EntityTag("a"))


def test_no_field_and_an_empty_list_match_nothing() -> None:
    assert not none_match([], EntityTag("a"))
    assert parse_if_none_match(" , ,") == []
    assert not none_match([" , ,"], EntityTag("a"))


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_tags_of_bodies_differ_when_bodies_differ(a: bytes, b: bytes) -> None:
    assert (tag_of(a) == tag_of(b)) is (a == b)
    assert parse_if_none_match(str(tag_of(a))) == [tag_of(a)]
