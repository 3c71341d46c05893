"""Corked output shared by the XenStore socket client and ``aioxen xenstored``: messages
queued during one event-loop iteration leave in one ``transport.write``."""

from __future__ import annotations

import asyncio


class CorkedOutput:
    """Encoded messages waiting for the next [`write_to`][]."""

    __slots__ = ("_chunks", "nbytes")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.nbytes = 0  # queued bytes (part of the connection's output backlog)

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self.nbytes += len(data)

    def clear(self) -> None:
        self._chunks.clear()
        self.nbytes = 0

    def write_to(self, transport: asyncio.WriteTransport | None) -> None:
        """Hand everything queued to ``transport`` as one write (dropped if it is gone)."""
        chunks = self._chunks
        if not chunks:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.clear()
        if transport is not None and not transport.is_closing():
            transport.write(data)


__all__ = ["CorkedOutput"]
