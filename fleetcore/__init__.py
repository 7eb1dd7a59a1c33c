"""certfleet fleetcore: the shared core every part builds on.

Identity and certificate profile, errors, settings loading, data layout, topics, addresses,
clock, reason codes, the revocation feed's wire format, publication URLs and key algorithms
(and soon TLS contexts). It imports nothing else of certfleet's; factory, registry, broker,
device_sim and certfleet import it.
"""

__all__: list[str] = []
