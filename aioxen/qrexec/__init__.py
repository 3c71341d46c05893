"""qrexec: Qubes RPC, asyncio-native, on every aioxen platform, wire-compatible with Qubes.

See ``docs/qrexec.md``.  Modules: `wire` (pure message formats), `framing` (messages over
streams), `data` (the data phase), `channels` (how channels are opened: aioxen vchan;
`vchan_socket`: Qubes' vchan-socket wire), `agent` (the VM side), `daemon` and `policy`
(the dom0 side), `client` (calls), `demo` (``python -m aioxen.qrexec.demo``).
"""

from __future__ import annotations

from aioxen.qrexec.agent import Agent, ServiceRequest
from aioxen.qrexec.channels import ChannelFactory, PendingChannel, VchanChannels
from aioxen.qrexec.client import CallResult, ServiceRefused, call, connect
from aioxen.qrexec.daemon import Daemon
from aioxen.qrexec.data import CallerEnd, ServiceEnd
from aioxen.qrexec.policy import (
    PolicyDecision,
    PolicyProgram,
    PolicyRequest,
    PolicySocket,
    RulePolicy,
)
from aioxen.qrexec.wire import InvalidRequest, QrexecProtocolError

__all__ = [
    "Agent",
    "CallResult",
    "CallerEnd",
    "ChannelFactory",
    "Daemon",
    "InvalidRequest",
    "PendingChannel",
    "PolicyDecision",
    "PolicyProgram",
    "PolicyRequest",
    "PolicySocket",
    "QrexecProtocolError",
    "RulePolicy",
    "ServiceEnd",
    "ServiceRefused",
    "ServiceRequest",
    "VchanChannels",
    "call",
    "connect",
]
