"""The HTTP side: REST history, the live WebSocket and (later) HL7 FHIR R4."""
