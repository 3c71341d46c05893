"""The agent role: the qrexec side that runs in a VM (Qubes' ``qrexec-agent``).

Theory of operation
-------------------
The agent is the *server* of the control channel: it offers port 512 (4 KiB rings) to
dom0, the daemon connects, both send ``HELLO`` and use the lower version.  Then the
daemon sends requests and the agent answers none of them on the control channel; each
request gets its own data channel:

* ``EXEC_CMDLINE {domain, port, "user:cmd"}`` -- connect to the data channel the caller
  (``domain``) offers on ``port``, handshake (version >= 2), and serve it: a
  ``QUBESRPC service+arg source`` command line runs a Python handler registered with
  [`Agent.service`][aioxen.qrexec.agent.Agent.service] or an executable
  ``<services_dir>/service+arg`` (else ``<services_dir>/service``) with Qubes' argv and
  environment (argv ``[path, arg]`` when the argument is not empty;
  ``QREXEC_SERVICE_FULL_NAME``, ``QREXEC_REMOTE_DOMAIN``, ``QREXEC_SERVICE_ARGUMENT``,
  ``QREXEC_REQUESTED_TARGET_TYPE``, ...), or, if that file is a Unix socket, a *socket
  service*: the agent connects, sends ``"service+arg source\\0"`` and relays bytes (exit
  code 0); any other command runs as ``sh -c cmd``.
  No such service: exit code 127; it could not be started: 125.
* ``JUST_EXEC`` -- the same, with the process's stdio on ``/dev/null``; exit code 0 is
  sent at once.
* ``SERVICE_CONNECT {domain, port, ident}`` -- dom0 allowed a call *this* VM asked for
  (request id ``ident``): the caller offers the data channel and runs the call (an
  in-process [`Agent.call`][aioxen.qrexec.agent.Agent.call], or a program speaking to
  the trigger socket, which is handed ``{domain, port}``, as Qubes' agent hands it to
  ``qrexec-client-vm``).
* ``SERVICE_REFUSED {ident}`` -- the call was denied: the in-process caller gets exit
  status 126 (``ServiceRefused``), a trigger-socket client sees its socket closed.

When a data channel is finished the agent reports ``CONNECTION_TERMINATED {domain,
port}`` so dom0 can reuse the port.  Calls from this VM go up as ``TRIGGER_SERVICE``,
``TRIGGER_SERVICE3`` or ``TRIGGER_SERVICE4`` depending on the negotiated version.

A broken or hostile daemon (a bad message, a lie about a length) is a
``ProtocolError``: logged, the control connection is dropped, its pending calls fail,
and the agent offers port 512 again for the next daemon; running data channels are not
affected.  Every call runs in its own task; none can stop the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aioxen.errors import ProtocolError
from aioxen.qrexec import wire as w
from aioxen.qrexec.channels import (
    CONTROL_BUFFER_SIZE,
    CONTROL_PORT,
    DATA_BUFFER_SIZE,
    ChannelFactory,
    Streams,
    aclose_pending,
    close_streams,
)
from aioxen.qrexec.client import CallResult, ServiceRefused, caller_session, run_call
from aioxen.qrexec.data import ServiceEnd, data_handshake, relay_process
from aioxen.qrexec.framing import exchange_hello, read_message, write_message

log = logging.getLogger(__name__)

ServiceHandler = Callable[..., Awaitable[int | None] | int | None]
"""``handler(stdin, stdout, request) -> exit code`` (``None`` = 0; may be ``async``):
``stdin`` an `asyncio.StreamReader`, ``stdout`` a writer (``write``, ``drain``,
``write_eof``), ``request`` a [`ServiceRequest`][aioxen.qrexec.agent.ServiceRequest]."""

TRIGGER_TIMEOUT = 30.0
"""Seconds a trigger-socket client has to send its request."""
TRIGGER_SOCKET_MODE = 0o666
"""The trigger socket's default file mode: any local user may ask for a call, as in
Qubes (its agent creates the socket with umask 0); dom0's policy is what decides."""
MAX_PENDING_CALLS = 256
"""Calls from this VM awaiting dom0's answer at once (more are refused locally)."""


@dataclasses.dataclass
class ServiceRequest:
    """What a Python service handler is told about its call."""

    service: str
    """The service name (``my.Service``)."""
    argument: str
    """The argument (``""`` if none)."""
    source: str
    """The calling domain's name."""
    user: str
    """The user dom0 asked to run the service as."""
    stderr: Any
    """The stderr writer (same interface as ``stdout``)."""
    requested_target: str | None = None


class Agent:
    """A qrexec agent (the VM side).  ``channels`` opens its vchans; ``services_dir``
    (a directory or a list, searched in order) holds executable services.

    ::

        agent = Agent(VchanChannels(platform), services_dir="/etc/qubes-rpc")

        @agent.service("my.Echo")
        async def echo(stdin, stdout, request):
            stdout.write(await stdin.read())
            return 0

        async with agent:                  # offers port 512 to dom0 (again after a drop)
            await agent.serve_forever()

    ``max_version`` caps the negotiated protocol version (2, 3 or 4).
    """

    def __init__(
        self,
        channels: ChannelFactory,
        *,
        services_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        daemon_domid: int = 0,
        max_version: int = w.PROTOCOL_VERSION,
        data_buffer_size: int = DATA_BUFFER_SIZE,
        shell: str = "/bin/sh",
    ) -> None:
        if not 2 <= max_version <= w.PROTOCOL_VERSION:
            raise ValueError(f"max_version must be 2..{w.PROTOCOL_VERSION}, not {max_version}")
        self.channels = channels
        if services_dir is None:
            dirs: list[Path] = []
        elif isinstance(services_dir, (str, os.PathLike)):
            dirs = [Path(services_dir)]
        else:
            dirs = [Path(d) for d in services_dir]
        self.services_dirs = dirs
        self.daemon_domid = daemon_domid
        self.max_version = max_version
        self.data_buffer_size = data_buffer_size
        self.shell = shell
        self.version: int | None = None
        """The negotiated control-channel version (``None`` while no daemon)."""
        self.connected = asyncio.Event()
        self.listening = asyncio.Event()
        """Set once port 512 is offered to dom0 (a daemon can connect)."""
        self._handlers: dict[str, ServiceHandler] = {}
        self._ctl: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future[tuple[int, int]]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serve: asyncio.Task[None] | None = None
        self._triggers: list[asyncio.Server] = []
        self._claims: list[Any] = []  # the trigger sockets' path claims
        self._closed = False

    # -- services ------------------------------------------------------------------
    def service(self, name: str) -> Callable[[ServiceHandler], ServiceHandler]:
        """Decorator: serve ``name`` (``my.Service``, or ``my.Service+arg`` for one
        argument only) with the decorated handler."""

        def register(handler: ServiceHandler) -> ServiceHandler:
            self.add_service(name, handler)
            return handler

        return register

    def add_service(self, name: str, handler: ServiceHandler) -> None:
        if not name or name.startswith("+") or " " in name:
            raise ValueError(f"bad qrexec service name {name!r}")
        self._handlers[name] = handler

    # -- lifetime ------------------------------------------------------------------
    async def start(self) -> None:
        """Start offering the control channel to dom0 (returns at once)."""
        if self._serve is None:
            self._serve = asyncio.create_task(self._serve_loop(), name="qrexec-agent")

    async def serve_forever(self) -> None:
        await self.start()
        assert self._serve is not None
        await asyncio.shield(self._serve)

    async def wait_listening(self, timeout: float | None = None) -> None:
        """Wait until port 512 is offered (raises what stopped the agent, if it stopped)."""
        await self.start()
        assert self._serve is not None
        async with asyncio.timeout(timeout):
            waiter = asyncio.ensure_future(self.listening.wait())
            try:
                await asyncio.wait({waiter, self._serve}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if self._serve.done() and not self.listening.is_set():
                self._serve.result()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a daemon is connected (``TimeoutError`` after ``timeout``)."""
        async with asyncio.timeout(timeout):
            await self.connected.wait()

    async def aclose(self) -> None:
        """Stop: the control channel, the trigger sockets and every running call."""
        self._closed = True
        for srv in self._triggers:
            srv.close()
        tasks = [t for t in (self._serve, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for srv in self._triggers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for claim in self._claims:
            claim.release()
        self._claims.clear()
        self._fail_pending(ConnectionResetError("qrexec agent closed"))

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- control channel -----------------------------------------------------------
    async def _serve_loop(self) -> None:
        while not self._closed:
            pending = await self.channels.listen(
                self.daemon_domid, CONTROL_PORT, buffer_size=CONTROL_BUFFER_SIZE
            )
            self.listening.set()
            try:
                reader, writer = await pending.accept(timeout=None)
            finally:
                await aclose_pending(pending)
            try:
                await self._session(reader, writer)
            except (ProtocolError, ConnectionError, asyncio.IncompleteReadError) as e:
                log.warning(
                    "qrexec agent: control connection from domain %d dropped: %s",
                    self.daemon_domid,
                    e,
                )
            except Exception:  # a bug: offer port 512 again rather than go deaf
                log.exception("qrexec agent: control connection failed")
            finally:
                self.connected.clear()
                self._ctl = None
                self.version = None
                self._fail_pending(ConnectionResetError("qrexec daemon disconnected"))
                await close_streams(writer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.version = await exchange_hello(
            reader, writer, version=self.max_version, min_version=2, what="qrexec daemon"
        )
        self._ctl = writer
        self.connected.set()
        log.debug("qrexec agent: daemon connected, version %d", self.version)
        while True:
            msg = await read_message(reader, limit=_from_daemon_limit, what="qrexec daemon")
            if msg is None:
                return  # clean EOF: the daemon went away
            t, p = msg.type, msg.payload
            if t in (w.MSG_EXEC_CMDLINE, w.MSG_JUST_EXEC):
                params = w.parse_exec_params(p)
                domain, port = params.connect_domain, params.connect_port
                assert params.cmdline is not None
                self._spawn(
                    self._run_request(t, domain, port, params.cmdline), f"qrexec-exec-{port}"
                )
            elif t == w.MSG_SERVICE_CONNECT:
                params = w.parse_exec_params(p)
                domain, port = params.connect_domain, params.connect_port
                fut = self._pending.pop(params.cmdline or "", None)
                if fut is None or fut.done():
                    log.warning(
                        "qrexec agent: SERVICE_CONNECT for unknown request %r", params.cmdline
                    )
                    self.terminated(domain, port)
                else:
                    fut.set_result((domain, port))
            else:  # MSG_SERVICE_REFUSED (the limit lets nothing else through)
                ident = w.parse_service_params(p)
                fut = self._pending.pop(ident, None)
                if fut is not None and not fut.done():
                    fut.set_exception(ServiceRefused(f"qrexec: request {ident!r} refused"))

    def terminated(self, domain: int, port: int) -> None:
        """Tell dom0 the data channel ``(domain, port)`` is finished."""
        if self._ctl is not None and not self._ctl.is_closing():
            write_message(
                self._ctl, w.MSG_CONNECTION_TERMINATED, w.encode_exec_params(domain, port)
            )

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    # -- requests from dom0 --------------------------------------------------------
    async def _run_request(self, t: int, domain: int, port: int, raw: str) -> None:
        try:
            reader, writer = await self.channels.connect(domain, port)
        except Exception as e:
            log.warning("qrexec agent: cannot connect to domain %d port %d: %s", domain, port, e)
            self.terminated(domain, port)
            return
        try:
            what = f"qrexec caller in domain {domain} (port {port})"
            version = await data_handshake(reader, writer, max_version=self.max_version, what=what)
            end = ServiceEnd(reader, writer, version, what=what)
            if t == w.MSG_JUST_EXEC:
                await end.exit(await self._just_exec(raw))
            else:
                await self._serve_call(end, raw)
        except (ProtocolError, OSError, asyncio.IncompleteReadError) as e:
            log.warning("qrexec agent: data channel %d/%d: %s", domain, port, e)
        except Exception:  # a bug in one call must not go unnoticed, nor stop the others
            log.exception("qrexec agent: data channel %d/%d failed", domain, port)
        finally:
            await close_streams(writer)
            self.terminated(domain, port)

    async def _serve_call(self, end: ServiceEnd, raw: str) -> int:
        """Run command line ``raw`` over ``end`` (exit code sent); returns the code."""
        try:
            cmd = w.parse_command_line(raw)
        except ProtocolError as e:
            log.warning("qrexec agent: bad command line %r: %s", raw[:80], e)
            await end.exit(w.EXIT_PROBLEM)
            return w.EXIT_PROBLEM
        rpc = cmd.rpc
        if rpc is None:
            return await self._exec_process(end, [self.shell, "-c", cmd.command], None)
        handler = self._handlers.get(rpc.descriptor) or self._handlers.get(rpc.service_name)
        if handler is not None:
            code = await self._run_handler(handler, end, cmd.user or "", rpc)
            await end.exit(code)
            return code
        path = self.find_service(rpc.descriptor)
        if path is None:
            log.info("qrexec agent: no service %s", rpc.descriptor)
            await end.exit(w.EXIT_NOT_FOUND)
            return w.EXIT_NOT_FOUND
        if stat.S_ISSOCK(path.stat().st_mode):
            descriptor = cmd.command.partition(" ")[2]  # all after "QUBESRPC ", as Qubes
            return await self._socket_service(end, path, descriptor)
        argv = [str(path)] + ([rpc.arg] if rpc.arg else [])
        return await self._exec_process(end, argv, service_env(rpc))

    async def _socket_service(self, end: ServiceEnd, path: Path, descriptor: str) -> int:
        """A socket service: connect, send ``"name+arg source\\0"``, then relay bytes both
        ways; exit code 0 once the socket's side is done (125 if it cannot connect)."""
        try:
            sr, sw = await asyncio.open_unix_connection(str(path))
        except OSError as e:
            log.warning("qrexec agent: socket service %s: %s", path, e)
            await end.exit(w.EXIT_PROBLEM)
            return w.EXIT_PROBLEM
        sw.write(descriptor.encode("utf-8", "surrogateescape") + b"\0")

        async def feed() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await end.stdin.read(65536):
                    sw.write(data)
                    await sw.drain()
                if sw.can_write_eof():
                    sw.write_eof()

        feeder = asyncio.ensure_future(feed())
        try:
            while data := await sr.read(65536):
                end.stdout.write(data)
                await end.stdout.drain()
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
            await close_streams(sw)
        await end.exit(0)
        return 0

    def find_service(self, service: str) -> Path | None:
        """The file serving ``name+arg``: ``name+arg`` first, then ``name``, in each
        services directory in turn (an executable, or a Unix socket: a socket service)."""
        name = service.partition("+")[0]
        if "/" in service or service.startswith("."):
            return None
        for d in self.services_dirs:
            for candidate in (service, name):
                p = d / candidate
                with contextlib.suppress(OSError):
                    mode = p.stat().st_mode
                    if stat.S_ISREG(mode) or stat.S_ISSOCK(mode):
                        return p
        return None

    async def _run_handler(
        self, handler: ServiceHandler, end: ServiceEnd, user: str, rpc: w.RpcRequest
    ) -> int:
        request = ServiceRequest(
            rpc.service_name, rpc.arg or "", rpc.source, user, end.stderr, rpc.target
        )
        try:
            result = handler(end.stdin, end.stdout, request)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            log.exception("qrexec agent: service %s failed", rpc.descriptor)
            return 1
        return 0 if result is None else int(result)

    async def _exec_process(
        self, end: ServiceEnd, argv: list[str], env: dict[str, str] | None
    ) -> int:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=None if env is None else {**os.environ, **env},
            )
        except FileNotFoundError:
            await end.exit(w.EXIT_NOT_FOUND)
            return w.EXIT_NOT_FOUND
        except OSError as e:
            log.warning("qrexec agent: cannot start %s: %s", argv[0], e)
            await end.exit(w.EXIT_PROBLEM)
            return w.EXIT_PROBLEM
        return await relay_process(end, proc)

    async def _just_exec(self, raw: str) -> int:
        try:
            cmd = w.parse_command_line(raw)
        except ProtocolError:
            return w.EXIT_PROBLEM
        if cmd.rpc is not None:
            path = self.find_service(cmd.rpc.descriptor)
            if path is None:
                return w.EXIT_NOT_FOUND
            argv = [str(path)] + ([cmd.rpc.arg] if cmd.rpc.arg else [])
            env: dict[str, str] | None = {**os.environ, **service_env(cmd.rpc)}
        else:
            argv, env = [self.shell, "-c", cmd.command], None
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except OSError:
            return w.EXIT_PROBLEM
        self._spawn(proc.wait(), f"qrexec-just-exec-{proc.pid}")
        return 0

    # -- calls from this VM --------------------------------------------------------
    async def request(self, target: str, service: str, *, source: str = "") -> tuple[int, int]:
        """Ask dom0 to call ``service`` (``name+arg``) in ``target``; returns the data
        channel ``(domain, port)`` to offer, or raises ``ServiceRefused``."""
        if self._ctl is None or self.version is None:
            raise ConnectionError("qrexec agent: no daemon connected")
        if len(self._pending) >= MAX_PENDING_CALLS:
            raise ServiceRefused("qrexec agent: too many calls awaiting dom0")
        ident = f"SOCKET{next(self._ids)}"
        trig = w.TriggerService(service, target, ident, source or None)
        if self.version < 4:
            trig = w.TriggerService(service, target, ident)  # no room for a source
        t, p = w.encode_trigger_service(self.version, trig)  # ValueError/ProtocolError: bad names
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        write_message(self._ctl, t, p)
        try:
            return await fut
        finally:
            self._pending.pop(ident, None)

    @contextlib.asynccontextmanager
    async def connect(
        self, target: str, service: str, *, keep_stderr: bool = False
    ) -> AsyncIterator[Streams]:
        """``async with agent.connect("vault", "my.Service+arg") as (reader, writer)``:
        stream a call; ``writer.write_eof()`` ends its stdin.  stderr as in
        [`qrexec.connect`][aioxen.qrexec.client.connect] (discarded unless
        ``keep_stderr``)."""
        domain, port = await self.request(target, service)
        try:
            async with caller_session(
                self.channels,
                domain,
                port,
                self.data_buffer_size,
                self.max_version,
                keep_stderr=keep_stderr,
            ) as streams:
                yield streams
        finally:
            self.terminated(domain, port)

    async def call(
        self, target: str, service: str, *, input: bytes = b"", timeout: float | None = None
    ) -> CallResult:
        """Call ``service`` in ``target``; refused calls return exit code 126."""
        async with asyncio.timeout(timeout):
            try:
                domain, port = await self.request(target, service)
            except ServiceRefused:
                return CallResult(b"", b"", w.EXIT_REFUSED)
            try:
                return await run_call(
                    self.channels, domain, port, input, self.data_buffer_size, self.max_version
                )
            finally:
                self.terminated(domain, port)

    # -- the trigger socket (qrexec-client-vm) ---------------------------------------
    async def start_trigger_socket(
        self, path: str | os.PathLike[str], *, mode: int = TRIGGER_SOCKET_MODE
    ) -> asyncio.Server:
        """Serve ``qrexec-client-vm``'s trigger protocol at ``path`` (a new socket,
        claimed exclusively): ``TRIGGER_SERVICE4`` in; ``{domain, port}`` out when dom0
        allows (the client then offers the data channel itself), the socket closed when
        it refuses; when the client closes its socket the call is finished.  The socket
        is removed by [`aclose`][aioxen.qrexec.agent.Agent.aclose].

        ``mode`` is the socket file's mode whatever the umask: by default
        ``TRIGGER_SOCKET_MODE`` (``0o666``),
        as Qubes' agent makes it -- every user of the VM may *ask* for a call, and
        dom0's policy decides.  Pass ``0o600`` (or ``0o660`` with a group owning the
        directory) to let fewer local users ask."""
        from aioxen.ownership import UnixSocketClaim

        claim = UnixSocketClaim.acquire(os.fspath(path), what="qrexec agent trigger socket")
        try:
            server = await asyncio.start_unix_server(
                self._trigger_client, sock=claim.bind(mode=mode)
            )
        except BaseException:
            claim.release()
            raise
        self._triggers.append(server)
        self._claims.append(claim)
        return server

    async def _trigger_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(TRIGGER_TIMEOUT):  # a silent client is dropped
                msg = await read_message(reader, limit=_trigger_limit, what="qrexec trigger client")
            if msg is None:
                return
            trig = w.parse_trigger_service(msg.type, msg.payload)
            try:
                domain, port = await self.request(
                    trig.target, trig.service, source=trig.source or ""
                )
            except (ServiceRefused, ConnectionError, ValueError) as e:
                log.info("qrexec agent: %s", e)
                return
            writer.write(w.encode_exec_params(domain, port))
            try:
                await writer.drain()
                while await reader.read(4096):  # the client closes when its call is done
                    pass
            except ConnectionError:
                pass
            finally:
                self.terminated(domain, port)
        except (ProtocolError, asyncio.IncompleteReadError, OSError) as e:  # TimeoutError too
            log.warning("qrexec agent: bad trigger-socket request: %s", e or "timed out")
        finally:
            await close_streams(writer)


_from_daemon_limit = w.payload_limits(
    (w.MSG_EXEC_CMDLINE, w.MSG_JUST_EXEC, w.MSG_SERVICE_CONNECT, w.MSG_SERVICE_REFUSED),
    "a daemon does not send {name}",
)
"""Payload limits of what a daemon may send an agent (anything else is an error)."""

_trigger_limit = w.payload_limits(
    (w.MSG_TRIGGER_SERVICE4,), "trigger socket wants MSG_TRIGGER_SERVICE4, got {name}"
)


def service_env(rpc: w.RpcRequest) -> dict[str, str]:
    """The environment Qubes gives an executable service."""
    env = {
        "QREXEC_SERVICE_FULL_NAME": rpc.descriptor if rpc.arg is not None else rpc.service_name,
        "QREXEC_REMOTE_DOMAIN": rpc.source,
        "QREXEC_REQUESTED_TARGET_TYPE": rpc.target_type or "",
        "QREXEC_AGENT_PID": str(os.getpid()),
    }
    if rpc.arg is not None:
        env["QREXEC_SERVICE_ARGUMENT"] = rpc.arg
    if rpc.target_type == "name" and rpc.target:
        env["QREXEC_REQUESTED_TARGET"] = rpc.target
    elif rpc.target_type == "keyword" and rpc.target:
        env["QREXEC_REQUESTED_TARGET_KEYWORD"] = rpc.target
    return env
