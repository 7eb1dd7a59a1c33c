"""Stock amqtt 0.12.1 for the benchmarks: amqtt.broker.Broker with its own TLS listener.

Only the anonymous-auth plugin is loaded (the default event/packet logger and $SYS plugins
are left out, which makes stock amqtt faster than its defaults: the comparison is
conservative). amqtt's listener sets CERT_OPTIONAL; clients present their certificates
anyway. Runs on the default asyncio loop, as amqtt does out of the box.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
from pathlib import Path

from amqtt.broker import Broker


async def main(port: int, data_dir: Path) -> None:
    config = {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"127.0.0.1:{port}",
                "ssl": True,
                "cafile": str(data_dir / "ca" / "chain.pem"),
                "certfile": str(data_dir / "tls" / "broker.crt"),
                "keyfile": str(data_dir / "tls" / "broker.key"),
            }
        },
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(args.port, args.data_dir))
