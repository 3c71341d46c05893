"""The daemon role: the dom0 side of qrexec (Qubes' ``qrexec-daemon``, for many VMs).

Theory of operation
-------------------
One [`Daemon`][aioxen.qrexec.daemon.Daemon] serves any number of domains; each gets a
*link*: the daemon connects to the domain's agent on control port 512 (retrying until
the agent offers it, and again after it goes away), both send ``HELLO``, the lower
version wins.  Per link the daemon keeps the table of data-channel ports it gave out:
port 513 + i; towards dom0 every ``i`` is usable, towards another VM only odd or even
``i`` (even when the peer's domid is lower than this VM's, odd when higher -- Qubes'
rule, so the two daemons of a VM->VM pair can never hand out the same port).  A port
is free again when the VM sends ``CONNECTION_TERMINATED {domain, port}`` naming the
domain it was reserved for.

A VM's ``TRIGGER_SERVICE*`` (a call it wants to make) is decided by the policy hook
([`aioxen.qrexec.policy`][]) in its own task; a malformed request or a denial answers
``SERVICE_REFUSED {ident}``.  When allowed:

* target another VM served here: the target's link allocates a port for the source
  and gets ``EXEC_CMDLINE {source, port, "user:QUBESRPC svc+arg source"}``; the source
  gets ``SERVICE_CONNECT {target, port, ident}``.  The two VMs then talk directly:
  the source offers the data channel, the target connects (dom0 only brokers).
* target a VM served by another daemon: its client socket ``<socket_dir>/qrexec.<name>``
  is asked for the port (what Qubes' ``qrexec-client -c`` does), then the source gets
  ``SERVICE_CONNECT`` as above.
* target ``dom0`` (or ``@adminvm``): the source's link allocates a port towards dom0,
  the source gets ``SERVICE_CONNECT {0, port, ident}``, and dom0 connects and runs the
  service locally (Python handlers from [`Daemon.service`][aioxen.qrexec.daemon.Daemon.service]
  or executables in ``services_dir``, exactly as an agent would).

Callers in dom0 use [`Daemon.request`][aioxen.qrexec.daemon.Daemon.request] (in
process) or the *client socket* ``<socket_dir>/qrexec.<domid>`` (and
``qrexec.<name>``) that ``qrexec-client`` speaks: the daemon sends ``HELLO`` (version
3), reads one ``EXEC_CMDLINE``/``JUST_EXEC {connect_domain, 0, cmdline}``, allocates a
port, answers the same message type with ``{domid, port}``, forwards the request to
the agent (``DEFAULT:`` replaced by the default user) and keeps the client's socket
open until the port is released.

Isolation: every link, every policy decision and every client connection is its own
task; a protocol error drops only that link or client (logged), never the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aioxen.errors import ProtocolError
from aioxen.qrexec import wire as w
from aioxen.qrexec.agent import Agent, ServiceHandler
from aioxen.qrexec.channels import (
    CONTROL_PORT,
    DATA_BUFFER_SIZE,
    ChannelFactory,
    close_streams,
)
from aioxen.qrexec.client import ServiceRefused, request_via_daemon_socket
from aioxen.qrexec.framing import exchange_hello, read_message, write_message
from aioxen.qrexec.policy import ADMIN_NAMES, PolicyHook, PolicyRequest, evaluate

log = logging.getLogger(__name__)

FIRST_DATA_PORT = 513
MAX_PORTS = 256
"""Data ports per link (513 .. 768), as Qubes' ``MAX_CLIENTS``."""
MAX_PENDING = 256
"""Policy decisions pending per link; more are refused."""
RECONNECT_DELAY = 0.2
REQUEST_TIMEOUT = 30.0
"""Seconds a client-socket connection has to send its HELLO and request."""


class _Link:
    """The daemon's state for one domain."""

    def __init__(self, name: str, domid: int) -> None:
        self.name = name
        self.domid = domid
        self.writer: asyncio.StreamWriter | None = None
        self.version: int | None = None
        self.up = asyncio.Event()
        self.ports: dict[int, int] = {}  # port -> domain it is reserved for
        self.waiters: dict[int, list[Callable[[], None]]] = {}
        self.pending = 0
        self.task: asyncio.Task[None] | None = None
        self.servers: list[tuple[asyncio.Server, Any]] = []

    def allocate(self, connect_domain: int) -> int:
        if connect_domain == 0:
            first, step = 0, 1
        else:
            first, step = (1 if connect_domain > self.domid else 0), 2
        for i in range(first, MAX_PORTS, step):
            if FIRST_DATA_PORT + i not in self.ports:
                self.ports[FIRST_DATA_PORT + i] = connect_domain
                return FIRST_DATA_PORT + i
        raise OSError(errno.EBUSY, f"qrexec: no free data port towards domain {self.domid}")

    def release(self, port: int, connect_domain: int) -> None:
        if self.ports.get(port) == connect_domain:
            del self.ports[port]
            for notify in self.waiters.pop(port, []):
                notify()

    def send(self, t: int, payload: bytes) -> None:
        if self.writer is None or self.writer.is_closing():
            raise ConnectionResetError(f"qrexec: domain {self.name} ({self.domid}) not connected")
        write_message(self.writer, t, payload)


@dataclasses.dataclass
class _Call:
    source: _Link
    ident: str
    target: str
    service: str
    requested_source: str | None


class Daemon:
    """The dom0 side.  ``domains`` maps names to domids; ``policy`` decides VM calls
    (see [`aioxen.qrexec.policy`][]; ``None`` denies all); ``services_dir`` holds
    dom0's own executable services; ``socket_dir`` (optional) gets the
    ``qrexec.<domid>``/``qrexec.<name>`` client sockets, mode ``socket_mode``
    (default ``0o600``) whatever the umask.  A domain may have domid 0: an
    agent running in dom0 itself (a loopback, as the Xen lab's tests use).

    ::

        daemon = Daemon(VchanChannels(platform), domains={"work": 2, "vault": 3},
                        policy=RulePolicy.load("my.policy"))
        async with daemon:
            result = await daemon.call("work", "my.Echo", input=b"hi")
    """

    def __init__(
        self,
        channels: ChannelFactory,
        *,
        domains: Mapping[str, int] | None = None,
        policy: PolicyHook | None = None,
        services_dir: str | os.PathLike[str] | None = None,
        socket_dir: str | os.PathLike[str] | None = None,
        socket_mode: int = 0o600,
        max_version: int = w.PROTOCOL_VERSION,
        default_user: str = "user",
        data_buffer_size: int = DATA_BUFFER_SIZE,
        policy_timeout: float | None = 60.0,
        connect_wait: float = 10.0,
    ) -> None:
        self.channels = channels
        self.policy = policy
        self.socket_dir = None if socket_dir is None else os.fspath(socket_dir)
        self.socket_mode = socket_mode
        """File mode of the client sockets in ``socket_dir`` whatever the umask (default
        owner-only; Qubes lets its ``qubes`` group in through the directory: pass
        ``0o660`` or ``0o666`` and let the directory's permissions decide)."""
        self.max_version = max_version
        self.default_user = default_user
        self.data_buffer_size = data_buffer_size
        self.policy_timeout = policy_timeout
        self.connect_wait = connect_wait
        """Seconds a call waits for its target's agent to connect before it is refused."""
        self.local = Agent(
            channels,
            services_dir=services_dir,
            max_version=max_version,
            data_buffer_size=data_buffer_size,
        )
        """dom0's own services run by this agent-like host (never started)."""
        self._links: dict[str, _Link] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False
        for name, domid in (domains or {}).items():
            self._add(name, domid)

    # -- configuration -------------------------------------------------------------
    def service(self, name: str) -> Callable[[ServiceHandler], ServiceHandler]:
        """Decorator: a dom0-local Python service (VMs call it with target ``dom0``)."""
        return self.local.service(name)

    def _add(self, name: str, domid: int) -> _Link:
        if name in ADMIN_NAMES or not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad domain name {name!r}")
        if not 0 <= domid < 0x7FF0:  # 0: an agent in dom0 itself (a loopback, for tests)
            raise ValueError(f"bad domid {domid} for {name}")
        if name in self._links or any(lk.domid == domid for lk in self._links.values()):
            raise ValueError(f"domain {name} ({domid}) already served")
        link = _Link(name, domid)
        self._links[name] = link
        return link

    async def add_domain(self, name: str, domid: int) -> None:
        """Serve one more domain (connects to its agent)."""
        link = self._add(name, domid)
        if self._started:
            await self._start_link(link)

    def link_up(self, name: str) -> bool:
        link = self._links.get(name)
        return link is not None and link.up.is_set()

    async def wait_connected(self, *names: str, timeout: float | None = None) -> None:
        """Wait until the agents of ``names`` (default all) are connected."""
        async with asyncio.timeout(timeout):
            for name in names or list(self._links):
                await self._links[name].up.wait()

    # -- lifetime ------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for link in self._links.values():
            await self._start_link(link)

    async def _start_link(self, link: _Link) -> None:
        link.task = self._spawn(self._link_loop(link), f"qrexec-daemon-{link.name}")
        if self.socket_dir is not None:
            await self._bind_client_sockets(link)

    async def aclose(self) -> None:
        self._closed = True
        for link in self._links.values():
            for server, claim in link.servers:
                server.close()
                claim.release()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.local.aclose()

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        await self.start()
        await asyncio.Event().wait()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- control links -------------------------------------------------------------
    async def _link_loop(self, link: _Link) -> None:
        while not self._closed:
            try:
                reader, writer = await self.channels.connect(link.domid, CONTROL_PORT)
            except (TimeoutError, OSError) as e:
                log.debug("qrexec daemon: agent of %s not there yet: %s", link.name, e)
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            except Exception as e:  # a bad advertisement: try again, never give the domain up
                log.warning("qrexec daemon: cannot connect to %s: %s", link.name, e)
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            try:
                link.version = await exchange_hello(
                    reader,
                    writer,
                    version=self.max_version,
                    min_version=2,
                    what=f"qrexec agent of {link.name}",
                )
                link.writer = writer
                link.up.set()
                log.info(
                    "qrexec daemon: %s (%d) connected, version %d",
                    link.name,
                    link.domid,
                    link.version,
                )
                await self._serve_link(link, reader)
            except (ProtocolError, ConnectionError, asyncio.IncompleteReadError) as e:
                log.warning("qrexec daemon: dropped domain %s (%d): %s", link.name, link.domid, e)
            except Exception:  # a bug: this link restarts, the others are unaffected
                log.exception("qrexec daemon: link to %s failed", link.name)
            finally:
                link.up.clear()
                link.writer = None
                for port, dom in list(link.ports.items()):
                    link.release(port, dom)
                await close_streams(writer)
            await asyncio.sleep(RECONNECT_DELAY)

    async def _serve_link(self, link: _Link, reader: asyncio.StreamReader) -> None:
        version = link.version
        assert version is not None  # negotiated before the link is served
        while True:
            msg = await read_message(
                reader, limit=_from_agent_limit, what=f"qrexec agent of {link.name}"
            )
            if msg is None:
                return
            if msg.type == w.MSG_CONNECTION_TERMINATED:
                params = w.parse_exec_params(msg.payload, with_cmdline=False)
                link.release(params.connect_port, params.connect_domain)
            else:
                # a trigger type the negotiated version does not use drops the link
                w.check_trigger_version(msg.type, version)
                self._trigger(link, msg.type, msg.payload)

    def _trigger(self, link: _Link, t: int, p: bytes) -> None:
        try:
            trig = w.parse_trigger_service(t, p)
        except w.InvalidRequest as e:  # sound structure, bad names: refuse it
            log.warning("qrexec daemon: bad request from %s: %s", link.name, e)
            link.send(w.MSG_SERVICE_REFUSED, w.encode_service_params(e.request_id))
            return
        if link.pending >= MAX_PENDING:
            log.warning("qrexec daemon: %s has too many pending requests", link.name)
            link.send(w.MSG_SERVICE_REFUSED, w.encode_service_params(trig.request_id))
            return
        call = _Call(link, trig.request_id, trig.target, trig.service, trig.source)
        link.pending += 1
        self._spawn(self._decide(call), f"qrexec-policy-{link.name}")

    async def _decide(self, call: _Call) -> None:
        link = call.source
        refused = w.MSG_SERVICE_REFUSED, w.encode_service_params(call.ident)
        try:
            request = PolicyRequest(link.name, call.target, call.service, call.requested_source)
            decision = await evaluate(
                self.policy, request, timeout=self.policy_timeout, default_user=self.default_user
            )
            if not decision.allow or not decision.target:
                log.info("qrexec daemon: refused %s", request)
                link.send(*refused)
                return
            service = decision.service or call.service
            if "+" not in service:
                service += "+"
            source = decision.source or link.name
            user = decision.user or self.default_user
            target = decision.target
            if target in ADMIN_NAMES:
                await self._to_dom0(link, call, service, source, decision.requested_target)
            elif target in self._links:
                tlink = self._links[target]
                if not await self._wait_up(tlink):
                    log.warning("qrexec daemon: target %s is not connected", target)
                    link.send(*refused)
                    return
                port = tlink.allocate(link.domid)
                try:
                    cmd = f"{user}:QUBESRPC {service} {source}"
                    tlink.send(w.MSG_EXEC_CMDLINE, w.encode_exec_params(link.domid, port, cmd))
                except ConnectionError:
                    tlink.release(port, link.domid)
                    raise
                link.send(
                    w.MSG_SERVICE_CONNECT, w.encode_exec_params(tlink.domid, port, call.ident)
                )
            else:
                await self._to_other_daemon(link, call, service, source, user, target)
        except (OSError, ProtocolError, ValueError) as e:  # peer gone, no free port, bad names
            log.warning("qrexec daemon: call from %s refused: %s", link.name, e)
            with contextlib.suppress(ConnectionError):
                link.send(*refused)
        except Exception:  # a bug must not leave the caller waiting
            log.exception("qrexec daemon: call from %s failed", link.name)
            with contextlib.suppress(ConnectionError):
                link.send(*refused)
        finally:
            link.pending -= 1

    async def _to_dom0(
        self, link: _Link, call: _Call, service: str, source: str, requested: str | None
    ) -> None:
        port = link.allocate(0)
        link.send(w.MSG_SERVICE_CONNECT, w.encode_exec_params(0, port, call.ident))
        keyword = (requested or "dom0").startswith("@")
        kind, name = ("keyword", (requested or "@adminvm")[1:]) if keyword else ("name", "dom0")
        cmd = f"{self.default_user}:QUBESRPC {service} {source} {kind} {name}"
        self._spawn(
            self.local._run_request(w.MSG_EXEC_CMDLINE, link.domid, port, cmd),
            f"qrexec-dom0-{service}",
        )

    async def _to_other_daemon(
        self, link: _Link, call: _Call, service: str, source: str, user: str, target: str
    ) -> None:
        path = (
            None if self.socket_dir is None else os.path.join(self.socket_dir, f"qrexec.{target}")
        )
        if path is None or "/" in target or not os.path.exists(path):
            log.warning("qrexec daemon: no domain %s", target)
            link.send(w.MSG_SERVICE_REFUSED, w.encode_service_params(call.ident))
            return
        cmd = f"{user}:QUBESRPC {service} {source}"
        domid, port, reader, writer = await request_via_daemon_socket(
            path, cmd, connect_domain=link.domid
        )
        link.send(w.MSG_SERVICE_CONNECT, w.encode_exec_params(domid, port, call.ident))
        self._spawn(_hold_until_eof(reader, writer), f"qrexec-relay-{target}")

    async def _wait_up(self, link: _Link) -> bool:
        """Whether ``link``'s agent is connected, waiting up to ``connect_wait`` for it
        (what Qubes does by starting the VM; here the agent may just be starting)."""
        if not link.up.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.connect_wait):
                    await link.up.wait()
        return link.up.is_set()

    # -- dom0 as the caller ---------------------------------------------------------
    async def request(
        self, target: str, service: str, *, user: str | None = None, just_exec: bool = False
    ) -> tuple[int, int]:
        """Start ``service`` (``name+arg``) in ``target`` for a caller in dom0; returns
        the data channel ``(domid, port)`` the caller must offer."""
        return await self.exec(
            target,
            f"{user or self.default_user}:QUBESRPC "
            f"{service if '+' in service else service + '+'} dom0",
            just_exec=just_exec,
        )

    async def exec(self, target: str, cmdline: str, *, just_exec: bool = False) -> tuple[int, int]:
        """Send ``cmdline`` (``user:command``) to ``target``'s agent; returns the data
        channel ``(domid, port)`` dom0 must offer."""
        link = self._links.get(target)
        if link is None:
            raise ServiceRefused(f"qrexec: no domain {target!r}")
        if not await self._wait_up(link):
            raise ConnectionRefusedError(f"qrexec: domain {target} is not connected")
        port = link.allocate(0)
        t = w.MSG_JUST_EXEC if just_exec else w.MSG_EXEC_CMDLINE
        try:
            link.send(t, w.encode_exec_params(0, port, cmdline))
        except ConnectionError:
            link.release(port, 0)
            raise
        return link.domid, port

    async def call(
        self, target: str, service: str, *, input: bytes = b"", timeout: float | None = None
    ) -> Any:
        """[`aioxen.qrexec.call`][aioxen.qrexec.client.call] with ``via=self``."""
        from aioxen.qrexec.client import call

        return await call(target, service, input=input, via=self, timeout=timeout)

    # -- the qrexec-client socket ----------------------------------------------------
    async def _bind_client_sockets(self, link: _Link) -> None:
        from aioxen.ownership import UnixSocketClaim

        assert self.socket_dir is not None
        for suffix in (str(link.domid), link.name):
            path = os.path.join(self.socket_dir, f"qrexec.{suffix}")
            claim = UnixSocketClaim.acquire(path, what=f"qrexec daemon socket for {link.name}")
            try:
                server = await asyncio.start_unix_server(
                    functools.partial(self._client, link), sock=claim.bind(self.socket_mode)
                )
            except BaseException:
                claim.release()
                raise
            link.servers.append((server, claim))

    async def _client(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):  # a silent client is dropped
                await exchange_hello(
                    reader,
                    writer,
                    version=w.CLIENT_PROTOCOL_VERSION,
                    min_version=2,
                    what="qrexec client",
                )
                msg = await read_message(reader, limit=_from_client_limit, what="qrexec client")
            if msg is None:
                return
            t = msg.type
            params = w.parse_exec_params(msg.payload)
            domain, cmd = params.connect_domain, params.cmdline or ""
            if cmd.startswith("DEFAULT:"):
                cmd = self.default_user + cmd[len("DEFAULT") :]
            if not await self._wait_up(link):
                raise ConnectionRefusedError(f"domain {link.name} is not connected")
            port = link.allocate(domain)
            released = asyncio.Event()
            link.waiters.setdefault(port, []).append(released.set)
            write_message(writer, t, w.encode_exec_params(link.domid, port))
            link.send(t, w.encode_exec_params(domain, port, cmd))
            await writer.drain()
            await released.wait()  # the client learns the end of the call by our close
        except (ProtocolError, OSError, asyncio.IncompleteReadError) as e:  # TimeoutError too
            log.warning("qrexec daemon: client of %s: %s", link.name, e or "timed out")
        finally:
            await close_streams(writer)


_from_agent_limit = w.payload_limits(
    (
        w.MSG_TRIGGER_SERVICE,
        w.MSG_TRIGGER_SERVICE3,
        w.MSG_TRIGGER_SERVICE4,
        w.MSG_CONNECTION_TERMINATED,
    ),
    "an agent does not send {name}",
)
_from_client_limit = w.payload_limits(
    (w.MSG_EXEC_CMDLINE, w.MSG_JUST_EXEC), "the client socket does not take {name}"
)


async def _hold_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep another daemon's client socket open until it closes it (the call's end)."""
    try:
        while await reader.read(4096):
            pass
    except ConnectionError:
        pass
    finally:
        await close_streams(writer)
