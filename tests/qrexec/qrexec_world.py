"""A qrexec test world: dom0 with a Daemon and VMs with Agents, in one process, on an
``inheap`` or ``unix`` vchan world (Q2's helper for tests/qrexec/test_{agent,daemon,call}*)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from vchan_harness import World

from aioxen.qrexec import Agent, Daemon, VchanChannels
from aioxen.qrexec.policy import PolicyHook

DOMAINS = {"work": 2, "vault": 3}


@contextlib.asynccontextmanager
async def qrexec_world(
    world: World,
    *,
    policy: PolicyHook | None = None,
    agent_version: int = 4,
    daemon_version: int = 4,
    services_dir: Any = None,
    dom0_services_dir: Any = None,
    domains: dict[str, int] | None = None,
) -> AsyncIterator[tuple[Daemon, dict[str, Agent]]]:
    """Start a daemon and one agent per domain; wait until every link is up."""
    domains = domains or DOMAINS
    agents = {
        name: Agent(
            VchanChannels(await world.platform(domid)),
            services_dir=services_dir,
            max_version=agent_version,
        )
        for name, domid in domains.items()
    }
    daemon = Daemon(
        VchanChannels(await world.platform(0)),
        domains=domains,
        policy=policy,
        services_dir=dom0_services_dir,
        max_version=daemon_version,
    )
    async with contextlib.AsyncExitStack() as stack:
        for a in agents.values():
            await stack.enter_async_context(a)
        await stack.enter_async_context(daemon)
        await daemon.wait_connected(timeout=30)
        for a in agents.values():
            await a.wait_connected(timeout=30)
        yield daemon, agents
