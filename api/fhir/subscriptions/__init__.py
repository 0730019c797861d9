"""Topic-based FHIR Subscriptions (Subscriptions R5 Backport IG, R4) over websockets.

``endpoints.router`` serves the Subscription resource and its operations under the
FHIR guard; ``socket.router`` serves ``/fhir/ws``, whose credential is a binding
token; ``SubscriptionService`` matches live readings, numbers and logs events and
delivers them to the sockets of this process.
"""

from api.fhir.subscriptions.endpoints import router
from api.fhir.subscriptions.service import SubscriptionService
from api.fhir.subscriptions.socket import router as ws_router
from api.fhir.subscriptions.store import SubscriptionStore

__all__ = ["SubscriptionService", "SubscriptionStore", "router", "ws_router"]
