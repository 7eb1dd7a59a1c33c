"""certfleet fleetcore: the shared core every part builds on.

Identity and certificate profile, errors, settings loading, data layout, topics, addresses,
clock, reason codes, the revocation feed's wire format, publication URLs, key algorithms and
every TLS context (``fleetcore.tls``). It imports nothing else of certfleet's; factory,
registry, broker, device_sim and certfleet import it.
"""

__all__: list[str] = []
