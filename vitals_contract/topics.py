"""MQTT topic layout, version 1.

Every kiosk owns one subtree, ``vitals/v1/kiosk/{kiosk_id}/...``, so a broker ACL
pattern such as ``vitals/v1/kiosk/%u/#`` confines a kiosk to its own data. Topics
never carry patient identifiers; patients appear only inside payloads of scans.

Directions:

========================  ==============  ====================================
leaf                      publisher       payload
========================  ==============  ====================================
``readings``              kiosk           :class:`ReadingsMessage` (QoS 1)
``status``                kiosk (retain)  :class:`KioskStatus`, also the Will
``events``                kiosk           :class:`ScanEvent` (QoS 1)
``heartbeat``             kiosk           :class:`Heartbeat` (QoS 0)
``command/result``        kiosk           :class:`CommandResult` (QoS 1)
``command``               operators       :class:`Command` (QoS 1)
``confirm``               bridge          :class:`CommitConfirmation` (QoS 1)
========================  ==============  ====================================

Alerts live outside the kiosk subtree, at ``vitals/v1/alerts/{kiosk_id}``, so a
kiosk cannot read other kiosks' alerts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

ROOT = "vitals/v1"
KIOSK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_KIOSK_ID_RE = re.compile(KIOSK_ID_PATTERN)


class Leaf(StrEnum):
    """The last levels of a kiosk topic."""

    READINGS = "readings"
    STATUS = "status"
    EVENTS = "events"
    HEARTBEAT = "heartbeat"
    COMMAND = "command"
    COMMAND_RESULT = "command/result"
    CONFIRM = "confirm"


def is_valid_kiosk_id(kiosk_id: str) -> bool:
    """Tell whether ``kiosk_id`` is safe as a single topic level and a username."""
    return bool(_KIOSK_ID_RE.match(kiosk_id))


def kiosk_topic(kiosk_id: str, leaf: Leaf, root: str = ROOT) -> str:
    """Build the topic of one kiosk's ``leaf``."""
    if not is_valid_kiosk_id(kiosk_id):
        raise ValueError(f"invalid kiosk id {kiosk_id!r}")
    return f"{root}/kiosk/{kiosk_id}/{leaf.value}"


def kiosk_filter(leaf: Leaf, root: str = ROOT) -> str:
    """Build the subscription filter matching ``leaf`` of every kiosk."""
    return f"{root}/kiosk/+/{leaf.value}"


def alert_topic(kiosk_id: str, root: str = ROOT) -> str:
    """Build the topic where the bridge publishes one kiosk's alerts."""
    if not is_valid_kiosk_id(kiosk_id):
        raise ValueError(f"invalid kiosk id {kiosk_id!r}")
    return f"{root}/alerts/{kiosk_id}"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A kiosk topic split into its kiosk id and leaf."""

    kiosk_id: str
    leaf: Leaf


def parse_kiosk_topic(topic: str, root: str = ROOT) -> ParsedTopic | None:
    """Split a kiosk topic, or return ``None`` when it is not one of ours."""
    prefix = f"{root}/kiosk/"
    if not topic.startswith(prefix):
        return None
    kiosk_id, _, rest = topic[len(prefix) :].partition("/")
    if not is_valid_kiosk_id(kiosk_id):
        return None
    try:
        return ParsedTopic(kiosk_id, Leaf(rest))
    except ValueError:
        return None
