"""The registry: devices, certificates, the revocation feed and the CRL, over HTTPS.

Entry points: :func:`registry.main.create_app` (the FastAPI app),
:class:`registry.server.RegistryServer` (HTTPS in a thread, for tests and the demo),
:func:`registry.server.serve` (``certfleet registry serve``), and
:func:`registry.telemetry.record_telemetry` (used by the telemetry ingest).
"""
