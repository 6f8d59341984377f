"""Output channels beyond the PACS: HL7 v2 ORU^R01 over MLLP (``hl7v2``), FHIR R4 DiagnosticReport (``fhir``)
and signed webhooks (``webhook``). Each is one small sender the export outbox drives (``reporting.export``):
it gets a :class:`~reporting.channels.base.Delivery` and returns a status text or raises ``DeliveryError``."""
