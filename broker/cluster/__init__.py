"""The broker cluster on NATS JetStream (docs/cluster.md).

- :mod:`broker.cluster.subjects`: MQTT topics and filters as NATS subjects;
- :mod:`broker.cluster.link`: the node's authenticated NATS connection, reconnected with
  backoff;
- :mod:`broker.cluster.router`: a message admitted on any node reaches every node, once;
- :mod:`broker.cluster.node`: the cluster side of one broker, built from its settings;
- :mod:`broker.cluster.natsd`: a local nats-server of ours (``certfleet up``, tests, benches).
"""

__all__: list[str] = []
