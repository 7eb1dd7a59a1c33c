"""Simulated devices: thousands of paho-mqtt clients over mTLS on one event loop per process.

- :mod:`device_sim.device`: :class:`SimDevice`, one device's lifecycle (connect, publish,
  back off, give up), and :class:`DeviceConfig`;
- :mod:`device_sim.runner`: :class:`SimRun`, devices spread over worker processes;
- :mod:`device_sim.worker`: one worker's loop and its reports;
- :mod:`device_sim.transport`: the TLS handshake stepped by the loop;
- :mod:`device_sim.paho_adapter`: the one use of paho's internals (handing it that socket);
- :mod:`device_sim.backoff`, :mod:`device_sim.errors`, :mod:`device_sim.stats`,
  :mod:`device_sim.telemetry`, :mod:`device_sim.bundle`: the pieces;
- :mod:`device_sim.cli`: ``certfleet sim run``.
"""
