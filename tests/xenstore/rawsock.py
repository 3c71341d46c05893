"""A blocking raw-socket XenStore peer for hostile-input tests (sends anything)."""

from __future__ import annotations

import socket
import struct

from aioxen.xenstore.wire import HEADER, Decoder, Message, XsType, join


class Raw:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.dec = Decoder(max_payload=1 << 20)
        self.queue: list[Message] = []
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, typ: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> None:
        self.sock.sendall(HEADER.pack(typ, req_id, tx_id, len(payload)) + payload)

    def recv(self) -> Message | None:
        """The next message, or None at EOF."""
        while not self.queue:
            if self.eof:
                return None
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                return None
            self.dec.feed(data)
            self.queue += self.dec.messages()
        return self.queue.pop(0)

    def reply(self) -> Message | None:
        """The next non-event message."""
        while True:
            msg = self.recv()
            if msg is None or msg.type != XsType.WATCH_EVENT:
                return msg

    def call(self, typ: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> Message:
        self.send(typ, payload, req_id, tx_id)
        msg = self.reply()
        assert msg is not None, "server closed the connection"
        assert msg.req_id == req_id and msg.tx_id == tx_id
        return msg

    def error(self, typ: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> str:
        msg = self.call(typ, payload, req_id, tx_id)
        assert msg.type == XsType.ERROR, (msg, payload)
        return msg.payload.rstrip(b"\x00").decode()

    def identify(self, domid: int) -> None:
        msg = self.call(XsType.CONTROL, join("aioxen-identify", str(domid)))
        assert msg.payload == b"OK\x00"


def header(typ: int, length: int, req_id: int = 1, tx_id: int = 0) -> bytes:
    return struct.pack("=IIII", typ, req_id, tx_id, length)
