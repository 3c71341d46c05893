"""qrexec: Qubes RPC, asyncio-native, on every aioxen platform, wire-compatible with Qubes.

See ``docs/qrexec.md``.  Modules: `wire` (pure message formats), `framing` (messages over
streams), `data` (the data phase), `channels` (how channels are opened), `agent` (the VM
side), `daemon` and `policy` (the dom0 side), `client` (calls).
"""

from __future__ import annotations
