"""HL7 FHIR R4 facade over the vitals store: Observation, Device, Patient."""

from fastapi import APIRouter

from api.fhir import routes

router = APIRouter()
# Flat, in order; the fallback last: it answers 404/405 for every path the routers
# before it do not serve.
for part in (routes.router, routes.fallback):
    router.routes.extend(part.routes)

__all__ = ["router"]
