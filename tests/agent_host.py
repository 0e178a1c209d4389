"""Runs several real agents (agent.runtime.Agent) in one process, one per config file.

Tests use it to run a fleet of 20 gateways without 20 interpreters:
`python tests/agent_host.py agent-01.yaml agent-02.yaml …`; SIGTERM stops them all (each a planned
stop), SIGKILL is a power cut for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from agent.config import load_config
from agent.runtime import Agent


async def main(paths: list[Path]) -> None:
    agents = []
    for path in paths:
        config, library = load_config(path)
        agents.append(Agent(config, library))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as group:
        for agent in agents:
            group.create_task(agent.run(stop), name=f"agent:{agent.config.gateway}")


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(main([Path(arg) for arg in sys.argv[1:]]))
