"""Client behaviour that needs a misbehaving or disappearing server: timeouts (pyxs's
known hang), lost connections, replies out of order, malformed replies, identify refusal."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from aioxen import ProtocolError
from aioxen.xenstore import XenStoreClient, XenStoreError
from aioxen.xenstore.wire import Decoder, Message, XsType

Behaviour = Callable[[list[Message], asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_xenstored(tmp_path: Path, behaviour: Behaviour) -> AsyncIterator[str]:
    """A scripted socket peer: ``behaviour(messages_so_far, writer)`` runs per batch."""
    path = str(tmp_path / "fake.sock")
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        dec = Decoder()
        try:
            while data := await reader.read(65536):
                dec.feed(data)
                msgs = dec.messages()
                if msgs:
                    await behaviour(msgs, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        yield path
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_silent_server_times_out_instead_of_hanging(tmp_path: Path) -> None:
    async def ignore(msgs: list[Message], w: asyncio.StreamWriter) -> None:
        return None

    async with fake_xenstored(tmp_path, ignore) as path:
        xs = XenStoreClient.for_unix_socket(path, 0, timeout=0.3)
        with pytest.raises(TimeoutError, match=r"read '/a/b'.*no reply within 0.3"):
            await xs.read("/a/b")
        with pytest.raises(TimeoutError, match="write"):
            await xs.write("/x", "y", timeout=0.1)  # per-call override
        with pytest.raises(TimeoutError):
            async with xs.transaction():
                pass
        with pytest.raises(TimeoutError):
            async with xs.watch("/w"):
                pass
        await xs.close()


async def test_replies_out_of_order_are_matched_by_req_id(tmp_path: Path) -> None:
    held: list[Message] = []

    async def reverse(msgs: list[Message], w: asyncio.StreamWriter) -> None:
        held.extend(msgs)
        if len(held) == 3:
            for m in reversed(held):
                path = m.payload.rstrip(b"\x00")
                w.write(Message(XsType.READ, m.req_id, 0, b"value of " + path).encode())
            # and a reply nobody asked for, which must be ignored
            w.write(Message(XsType.READ, 0xDEAD, 0, b"stray").encode())

    async with fake_xenstored(tmp_path, reverse) as path:
        xs = XenStoreClient.for_unix_socket(path, 0, timeout=5)
        got = await asyncio.gather(xs.read("/a"), xs.read("/b"), xs.read("/c"))
        assert list(got) == [b"value of /a", b"value of /b", b"value of /c"]
        await xs.close()


async def test_connection_loss_fails_waiters_and_watches(tmp_path: Path) -> None:
    async def die_on_read(msgs: list[Message], w: asyncio.StreamWriter) -> None:
        for m in msgs:
            if m.type == XsType.WATCH:
                w.write(m.ok_reply().encode())
                w.write(Message(XsType.WATCH_EVENT, 0, 0, m.payload).encode())
            elif m.type == XsType.READ:
                w.close()

    async with fake_xenstored(tmp_path, die_on_read) as path:
        xs = XenStoreClient.for_unix_socket(path, 0, timeout=5)
        async with xs.watch("/w", token="t") as w:
            assert await w.next(timeout=5) == "/w"
            with pytest.raises(ConnectionResetError, match="lost"):
                await xs.read("/a")
            with pytest.raises(ConnectionResetError):
                await w.next(timeout=5)
        # The next request opens a new connection.
        with pytest.raises(ConnectionResetError):
            await xs.read("/again")
        await xs.close()


async def test_oversized_reply_is_a_protocol_error(tmp_path: Path) -> None:
    async def huge(msgs: list[Message], w: asyncio.StreamWriter) -> None:
        w.write(struct.pack("=IIII", XsType.READ, msgs[0].req_id, 0, 100000))

    async with fake_xenstored(tmp_path, huge) as path:
        xs = XenStoreClient.for_unix_socket(path, 0, timeout=5)
        with pytest.raises(ProtocolError, match="XENSTORE_PAYLOAD_MAX") as info:
            await xs.read("/a")
        assert info.value.field == "len"
        await xs.close()


async def test_wrong_reply_type_is_a_protocol_error(tmp_path: Path) -> None:
    async def wrong(msgs: list[Message], w: asyncio.StreamWriter) -> None:
        for m in msgs:
            w.write(Message(XsType.DIRECTORY, m.req_id, 0, b"").encode())

    async with fake_xenstored(tmp_path, wrong) as path:
        xs = XenStoreClient.for_unix_socket(path, 0, timeout=5)
        with pytest.raises(ProtocolError, match="DIRECTORY"):
            await xs.read("/a")
        await xs.close()


async def test_identify_refused_by_a_foreign_xenstored(tmp_path: Path) -> None:
    """Xen's own xenstored answers an unknown CONTROL with EINVAL: a clear error."""

    async def xen_like(msgs: list[Message], w: asyncio.StreamWriter) -> None:
        for m in msgs:
            w.write(m.error_reply(22).encode())

    async with fake_xenstored(tmp_path, xen_like) as path:
        xs = XenStoreClient.for_unix_socket(path, 5, timeout=5)
        with pytest.raises(XenStoreError, match=r"identify.*EINVAL"):
            await xs.read("domid")
        await xs.close()


async def test_domid_zero_sends_nothing_extra(tmp_path: Path) -> None:
    seen: list[Message] = []

    async def record(msgs: list[Message], w: asyncio.StreamWriter) -> None:
        seen.extend(msgs)
        for m in msgs:
            w.write(Message(XsType.READ, m.req_id, 0, b"0").encode())

    async with fake_xenstored(tmp_path, record) as path:
        xs = XenStoreClient.for_unix_socket(path, 0, timeout=5)
        assert await xs.read("domid") == b"0"
        assert [m.type for m in seen] == [XsType.READ]
        await xs.close()


async def test_missing_socket_names_the_path(tmp_path: Path) -> None:
    xs = XenStoreClient.for_unix_socket(str(tmp_path / "nope"), 0, timeout=5)
    with pytest.raises(FileNotFoundError) as info:
        await xs.read("/a")
    assert info.value.filename == str(tmp_path / "nope")
    await xs.close()


async def test_closed_client_refuses_requests(tmp_path: Path) -> None:
    xs = XenStoreClient.for_unix_socket(str(tmp_path / "nope"), 0)
    await xs.close()
    with pytest.raises(ConnectionResetError, match="closed"):
        await xs.read("/a")


async def test_xenbus_quirks_garbage_ids_and_one_request_in_flight() -> None:
    """A stand-in for Linux's xenbus device on a socket: it answers WATCH itself, stamps
    garbage req_id/tx_id on watch events and (like old kernels) on replies too.  The
    client must still match replies and never have two requests outstanding."""
    import socket
    import threading

    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    problems: list[str] = []

    def fake_kernel() -> None:
        dec = Decoder()
        answered = 0
        while True:
            data = kernel.recv(65536)
            if not data:
                return
            dec.feed(data)
            msgs = dec.messages()
            if len(msgs) > 1:
                problems.append(f"{len(msgs)} requests in flight")
            for m in msgs:
                garbage = 0xBAD0000 + answered
                answered += 1
                if m.type == XsType.WATCH:
                    kernel.sendall(Message(XsType.WATCH, garbage, 0, b"OK\x00").encode())
                    kernel.sendall(Message(XsType.WATCH_EVENT, garbage, 77, m.payload).encode())
                elif m.type == XsType.UNWATCH:
                    kernel.sendall(Message(XsType.UNWATCH, garbage, 0, b"OK\x00").encode())
                elif m.type == XsType.READ:
                    kernel.sendall(
                        Message(XsType.READ, garbage, 5, b"v:" + m.payload.rstrip(b"\x00")).encode()
                    )
                    kernel.sendall(
                        Message(
                            XsType.WATCH_EVENT, 0xFFFFFFFF, 0xFFFFFFFF, b"/w/x\x00tok\x00"
                        ).encode()
                    )

    thread = threading.Thread(target=fake_kernel, daemon=True)
    thread.start()
    xs = XenStoreClient.for_xenbus("/dev/xen/xenbus", timeout=5, opener=lambda _: ours.detach())
    async with xs.watch("/w", token="tok") as w:
        assert await w.next(timeout=5) == "/w"
        got = await asyncio.gather(*(xs.read(f"/k{i}") for i in range(20)))
        assert list(got) == [f"v:/k{i}".encode() for i in range(20)]
        assert await w.next(timeout=5) == "/w/x"
    await xs.close()
    kernel.close()
    thread.join(5)
    assert problems == []
