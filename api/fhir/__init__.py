"""HL7 FHIR R4 facade over the vitals store: Observation, Device, Patient."""

from api.fhir.routes import router

__all__ = ["router"]
