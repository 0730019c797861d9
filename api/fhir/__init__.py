"""HL7 FHIR R4 facade over the vitals store: Observation, Device, Patient."""

from fastapi import APIRouter

from api.fhir import export, routes, subscriptions

# The export service starts and stops with the app (merged by include_router).
router = APIRouter(lifespan=export.lifespan)
# Flat, in order; the fallback last: it answers 404/405 for every path the routers
# before it do not serve.
for part in (routes.router, export.router, subscriptions.router, routes.fallback):
    router.routes.extend(part.routes)

__all__ = ["router"]
