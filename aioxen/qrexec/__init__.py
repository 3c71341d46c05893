"""qrexec: Qubes RPC, asyncio-native, on every aioxen platform, wire-compatible with Qubes.

See ``docs/qrexec.md``.  Modules: `wire` (pure message formats), `framing` (messages over
streams), `data` (the data phase), `channels` (how channels are opened), `agent` (the VM
side), `daemon` and `policy` (the dom0 side), `client` (calls).
"""

from __future__ import annotations

from aioxen.qrexec.agent import Agent, ServiceRequest
from aioxen.qrexec.channels import ChannelFactory, PendingChannel, VchanChannels
from aioxen.qrexec.client import CallResult, ServiceRefused, call, connect
from aioxen.qrexec.daemon import Daemon
from aioxen.qrexec.policy import (
    PolicyDecision,
    PolicyProgram,
    PolicyRequest,
    PolicySocket,
    RulePolicy,
)

__all__ = [
    "Agent",
    "CallResult",
    "ChannelFactory",
    "Daemon",
    "PendingChannel",
    "PolicyDecision",
    "PolicyProgram",
    "PolicyRequest",
    "PolicySocket",
    "RulePolicy",
    "ServiceRefused",
    "ServiceRequest",
    "VchanChannels",
    "call",
    "connect",
]
