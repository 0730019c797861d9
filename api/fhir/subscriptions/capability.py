"""What the CapabilityStatement says about Subscriptions (backport IG, R4 server).

The IG asks an R4 server to name ``backport-subscription-server-r4`` in
``instantiates``, to list the backport Subscription profile and the operations,
and to advertise its topics with the ``capabilitystatement-subscriptiontopic-
canonical`` extension (R4 has no SubscriptionTopic resource). The websocket URL
goes in the core ``capabilitystatement-websocket`` extension.
"""

from __future__ import annotations

from typing import Any

from api.fhir.subscriptions import criteria
from api.fhir.subscriptions.resources import BACKPORT, SUBSCRIPTION_PROFILE

INSTANTIATES = f"{BACKPORT}/CapabilityStatement/backport-subscription-server-r4"
TOPIC_EXTENSION = (
    f"{BACKPORT}/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"
)
WEBSOCKET_EXTENSION = (
    "http://hl7.org/fhir/StructureDefinition/capabilitystatement-websocket"
)
OPERATIONS = {
    "status": f"{BACKPORT}/OperationDefinition/backport-subscription-status",
    "events": f"{BACKPORT}/OperationDefinition/backport-subscription-events",
    "get-ws-binding-token": (
        f"{BACKPORT}/OperationDefinition/backport-subscription-get-ws-binding-token"
    ),
}
_DOC = (
    f"Topic-based Subscriptions (Subscriptions R5 Backport IG, R4). One topic: "
    f"{criteria.TOPIC_URL} ({criteria.TOPIC_TITLE}; focus Observation), filters "
    f"(backport-filter-criteria, 'Observation?...'): patient (alias subject), code, "
    f"device. Channel websocket only, payload application/fhir+json, content empty, "
    f"id-only (default) or full-resource (id-only, full-resource and a patient "
    f"filter need system/Observation.read), heartbeat period in seconds. Only the creating "
    f"client sees a Subscription. Scopes system/Subscription.read (GET) and "
    f"system/Subscription.write (POST, DELETE). $events keeps the newest events "
    f"per Subscription (configured); older ones are purged."
)


def websocket_url(base: str) -> str:
    """Return the ``/fhir/ws`` URL for the FHIR base ``http(s)://host/fhir``."""
    return "ws" + base.removeprefix("http").removesuffix("/fhir") + "/fhir/ws"


def websocket_extension(base: str) -> dict[str, Any]:
    """Return the ``capabilitystatement-websocket`` extension for ``rest``."""
    return {"url": WEBSOCKET_EXTENSION, "valueUri": websocket_url(base)}


def subscription_resource() -> dict[str, Any]:
    """Return the ``rest.resource`` entry of Subscription."""
    return {
        "extension": [{"url": TOPIC_EXTENSION, "valueCanonical": criteria.TOPIC_URL}],
        "type": "Subscription",
        "supportedProfile": [SUBSCRIPTION_PROFILE],
        "documentation": _DOC,
        "interaction": [
            {"code": "read"},
            {"code": "create"},
            {"code": "delete"},
            {"code": "search-type"},
        ],
        "searchParam": [
            {
                "name": "status",
                "definition": "http://hl7.org/fhir/SearchParameter/Subscription-status",
                "type": "token",
            }
        ],
        "operation": [
            {"name": name, "definition": definition}
            for name, definition in OPERATIONS.items()
        ],
    }
