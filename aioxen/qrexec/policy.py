"""qrexec policy: who may call which service in which domain.

Theory of operation
-------------------
Every call a VM asks for (``TRIGGER_SERVICE*`` on its control channel) is decided in
dom0 before anything runs: a [`PolicyRequest`][aioxen.qrexec.policy.PolicyRequest]
(source domain, intended target, ``service+argument``) goes to a *policy hook*, which
answers with a [`PolicyDecision`][aioxen.qrexec.policy.PolicyDecision] (allow: the
resolved target, the user to run as; or deny).  The daemon evaluates hooks in a task of
their own, so a slow hook delays only its own request.

A hook is any of

* a Python callable (plain or ``async``) returning a ``PolicyDecision`` or a ``bool``
  (``True`` = allow to the intended target as ``user``);
* [`PolicySocket`][aioxen.qrexec.policy.PolicySocket] -- Qubes' policy daemon line
  protocol over a Unix socket (``/run/qubes/policy.sock`` on Qubes): the request is
  ``source=...``, optional ``requested_source=...``, ``intended_target=...``,
  ``service_and_arg=...`` lines and an empty line; the answer, read to EOF, is
  ``key=value`` lines: ``result=allow|deny`` and, for allow exactly, ``user=``,
  ``target=``, ``requested_target=``, ``autostart=True|False`` (optional
  ``target_uuid=``, ``service=``, ``policy_source=``; unknown keys are ignored, a line
  without ``=``, a repeated key, a NUL byte or an incomplete answer is malformed and
  denies);
* [`PolicyProgram`][aioxen.qrexec.policy.PolicyProgram] -- a program run as
  ``PROGRAM -- SOURCE TARGET SERVICE+ARG`` printing the same lines (Qubes'
  ``qrexec-policy-exec``); a non-zero exit status denies;
* [`RulePolicy`][aioxen.qrexec.policy.RulePolicy] -- a small rule table in the spirit
  of Qubes' policy files (``SERVICE ARG SOURCE TARGET ACTION [target=X] [user=U]``),
  first match wins, no match denies.

Any error inside a hook (an exception, a timeout, a malformed answer) denies the call
and is logged: a broken policy never allows anything.  [`serve_policy_socket`][] serves
any hook over the socket protocol, for Qubes' own ``qrexec-daemon`` or for tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_ANSWER = 4096
"""Largest policy answer read (Qubes reads at most 4 KiB)."""
MAX_REQUEST = 65536 + 1024
"""Largest policy request a [`serve_policy_socket`][] server reads."""
DEFAULT_POLICY_TIMEOUT = 60.0
ADMIN_NAMES = frozenset({"dom0", "@adminvm"})


class PolicyError(Exception):
    """A policy answer could not be understood (the call is denied)."""


@dataclasses.dataclass(frozen=True)
class PolicyRequest:
    """One call to decide: ``source`` asks to run ``service`` (``name+arg``) in
    ``target`` (as the caller wrote it: a name, ``dom0``, ``@adminvm``, ...)."""

    source: str
    target: str
    service: str
    requested_source: str | None = None

    @property
    def service_name(self) -> str:
        return self.service.partition("+")[0]

    @property
    def argument(self) -> str:
        return self.service.partition("+")[2]

    def to_lines(self) -> bytes:
        """The request in the policy-socket protocol."""
        out = [f"source={self.source}"]
        if self.requested_source is not None:
            out.append(f"requested_source={self.requested_source}")
        out += [f"intended_target={self.target}", f"service_and_arg={self.service}", "", ""]
        return "\n".join(out).encode()

    @classmethod
    def parse(cls, data: bytes) -> PolicyRequest:
        """Parse a policy-socket request (ending with an empty line)."""
        text = _text(data)
        if not text.endswith("\n\n"):
            raise PolicyError("policy request does not end with an empty line")
        fields = _fields(text[:-2].split("\n"), "policy request")
        try:
            return cls(
                source=fields.pop("source"),
                target=fields.pop("intended_target"),
                service=fields.pop("service_and_arg"),
                requested_source=fields.pop("requested_source", None),
            )
        except KeyError as e:
            raise PolicyError(f"policy request lacks {e.args[0]}=") from None


@dataclasses.dataclass(frozen=True)
class PolicyDecision:
    """A policy's answer.  For ``allow``: ``target`` (the resolved domain name; ``dom0``
    for the admin domain), ``user`` to run as, ``requested_target`` (as the caller wrote
    it), optional ``service`` (a replacement ``name+arg``) and ``source`` (the source
    name the target sees)."""

    allow: bool
    target: str | None = None
    user: str | None = None
    requested_target: str | None = None
    autostart: bool = True
    service: str | None = None
    source: str | None = None

    @classmethod
    def allowed(cls, target: str, user: str = "user", **kw: object) -> PolicyDecision:
        kw.setdefault("requested_target", target)
        target = "dom0" if target in ADMIN_NAMES else target
        return cls(True, target=target, user=user, **kw)  # type: ignore[arg-type]

    @classmethod
    def denied(cls) -> PolicyDecision:
        return cls(False)

    def to_lines(self) -> bytes:
        """The answer in the policy-socket protocol."""
        if not self.allow:
            return b"result=deny\n"
        lines = [
            "result=allow",
            f"user={self.user or 'user'}",
            f"target={self.target}",
            f"requested_target={self.requested_target or self.target}",
            f"autostart={self.autostart}",
        ]
        if self.service is not None:
            lines.append(f"service={self.service}")
        if self.source is not None:
            lines.append(f"policy_source={self.source}")
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> PolicyDecision:
        """Parse a policy answer strictly (see the module docstring)."""
        if not data:
            raise PolicyError("empty policy answer")
        text = _text(data)
        if text.endswith("\n"):
            text = text[:-1]
        fields = _fields(text.split("\n"), "policy answer")
        result = fields.get("result")
        needed = ("user", "target", "requested_target", "autostart")
        if result == "deny":
            if any(k in fields for k in needed):
                raise PolicyError("policy answer: deny with allow fields")
            return cls.denied()
        if result != "allow":
            raise PolicyError(f"policy answer: result={result!r}")
        missing = [k for k in needed if k not in fields]
        if missing:
            raise PolicyError(f"policy answer: allow without {', '.join(missing)}")
        if fields["autostart"] not in ("True", "False"):
            raise PolicyError(f"policy answer: autostart={fields['autostart']!r}")
        return cls(
            True,
            target=fields["target"],
            user=fields["user"],
            requested_target=fields["requested_target"],
            autostart=fields["autostart"] == "True",
            service=fields.get("service"),
            source=fields.get("policy_source"),
        )


def _text(data: bytes) -> str:
    if b"\0" in data:
        raise PolicyError("NUL byte in policy message")
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise PolicyError(f"policy message is not UTF-8: {e}") from None


def _fields(lines: Iterable[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        key, eq, value = line.partition("=")
        if not eq:
            raise PolicyError(f"{what}: line without '=': {line[:80]!r}")
        if key in out:
            raise PolicyError(f"{what}: {key}= given twice")
        out[key] = value
    return out


HookResult = PolicyDecision | bool
PolicyHook = Callable[[PolicyRequest], HookResult | Awaitable[HookResult]]
"""A policy hook: ``hook(request) -> PolicyDecision | bool`` (may be ``async``)."""


async def evaluate(
    hook: PolicyHook | None,
    request: PolicyRequest,
    *,
    timeout: float | None = DEFAULT_POLICY_TIMEOUT,
    default_user: str = "user",
) -> PolicyDecision:
    """Run ``hook`` on ``request``; any failure (or no hook at all) denies."""
    if hook is None:
        log.info("qrexec policy: no policy, denied %s", request)
        return PolicyDecision.denied()
    try:
        async with asyncio.timeout(timeout):
            answer = hook(request)
            if inspect.isawaitable(answer):
                answer = await answer
    except Exception as e:  # a broken policy denies; it never allows
        log.warning("qrexec policy: %s failed (%s): denied", request, e)
        return PolicyDecision.denied()
    if answer is True:
        return PolicyDecision.allowed(request.target, default_user)
    if isinstance(answer, PolicyDecision):
        if answer.allow and not answer.target:
            return dataclasses.replace(
                answer,
                target="dom0" if request.target in ADMIN_NAMES else request.target,
                user=answer.user or default_user,
            )
        return answer
    if answer is not False:
        log.warning("qrexec policy: %r answered %r: denied", hook, answer)
    return PolicyDecision.denied()


class PolicySocket:
    """A hook asking Qubes' policy daemon (or [`serve_policy_socket`][]) at ``path``."""

    def __init__(self, path: str | os.PathLike[str] = "/run/qubes/policy.sock") -> None:
        self.path = os.fspath(path)

    async def __call__(self, request: PolicyRequest) -> PolicyDecision:
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(request.to_lines())
            await writer.drain()
            data = await reader.read(MAX_ANSWER + 1)
            while chunk := await reader.read(MAX_ANSWER + 1 - len(data)):
                data += chunk
                if len(data) > MAX_ANSWER:
                    break
            if len(data) > MAX_ANSWER:
                raise PolicyError(f"{self.path}: policy answer over {MAX_ANSWER} bytes")
        finally:
            writer.close()
        return PolicyDecision.parse(data)

    def __repr__(self) -> str:
        return f"PolicySocket({self.path!r})"


class PolicyProgram:
    """A hook running ``program -- SOURCE TARGET SERVICE+ARG`` (``qrexec-policy-exec``
    style); its stdout is parsed as a policy answer, a non-zero status denies."""

    def __init__(self, program: str | os.PathLike[str]) -> None:
        self.program = os.fspath(program)

    async def __call__(self, request: PolicyRequest) -> PolicyDecision:
        proc = await asyncio.create_subprocess_exec(
            self.program,
            "--",
            request.source,
            request.target,
            request.service,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            data = await proc.stdout.read(MAX_ANSWER + 1)
            status = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if status != 0:
            raise PolicyError(f"{self.program} exited with status {status}")
        if len(data) > MAX_ANSWER:
            raise PolicyError(f"{self.program}: answer over {MAX_ANSWER} bytes")
        return PolicyDecision.parse(data)

    def __repr__(self) -> str:
        return f"PolicyProgram({self.program!r})"


@dataclasses.dataclass(frozen=True)
class Rule:
    service: str
    argument: str  # "*" or "+ARG"
    source: str
    target: str
    action: str
    redirect: str | None = None
    user: str | None = None

    def matches(self, request: PolicyRequest) -> bool:
        if self.service not in ("*", request.service_name):
            return False
        if self.argument != "*" and self.argument != "+" + request.argument:
            return False
        return _domain_matches(self.source, request.source) and _domain_matches(
            self.target, request.target
        )


def _domain_matches(pattern: str, name: str) -> bool:
    if pattern in ("*", "@anyvm"):
        return name not in ADMIN_NAMES or pattern == "*"
    if pattern in ADMIN_NAMES:
        return name in ADMIN_NAMES
    return pattern == name


class RulePolicy:
    """A rule table (first match wins, no match denies).  Each line::

        SERVICE  ARG  SOURCE  TARGET  ACTION  [target=NAME] [user=NAME]

    ``SERVICE`` a name or ``*``; ``ARG`` ``*`` or ``+ARG`` (``+`` = no argument);
    ``SOURCE``/``TARGET`` a domain name, ``@anyvm`` (any domain but dom0), ``*`` (any),
    ``dom0`` or ``@adminvm``; ``ACTION`` ``allow``, ``deny`` or ``ask`` (no one to ask
    here: denied).  ``target=`` redirects the call, ``user=`` runs it as that user.
    ``#`` starts a comment."""

    def __init__(self, rules: Iterable[Rule] = (), *, default_user: str = "user") -> None:
        self.rules = list(rules)
        self.default_user = default_user

    @classmethod
    def parse(cls, text: str, *, source: str = "<policy>") -> RulePolicy:
        rules: list[Rule] = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            where = f"{source}:{n}"
            if len(words) < 5:
                raise ValueError(f"{where}: want SERVICE ARG SOURCE TARGET ACTION: {raw!r}")
            service, arg, src, tgt, action, *opts = words
            if action not in ("allow", "deny", "ask"):
                raise ValueError(f"{where}: unknown action {action!r}")
            if arg != "*" and not arg.startswith("+"):
                raise ValueError(f"{where}: argument must be '*' or start with '+': {arg!r}")
            kw: dict[str, str] = {}
            for opt in opts:
                key, eq, value = opt.partition("=")
                if not eq or key not in ("target", "user") or not value:
                    raise ValueError(f"{where}: unknown option {opt!r}")
                kw[key] = value
            rules.append(Rule(service, arg, src, tgt, action, kw.get("target"), kw.get("user")))
        return cls(rules)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RulePolicy:
        return cls.parse(Path(path).read_text(), source=os.fspath(path))

    def __call__(self, request: PolicyRequest) -> PolicyDecision:
        for rule in self.rules:
            if rule.matches(request):
                if rule.action != "allow":
                    return PolicyDecision.denied()
                target = rule.redirect or request.target
                return PolicyDecision.allowed(
                    target,
                    rule.user or self.default_user,
                    requested_target=request.target,
                )
        return PolicyDecision.denied()


async def serve_policy_socket(
    hook: PolicyHook, path: str | os.PathLike[str], *, timeout: float = DEFAULT_POLICY_TIMEOUT
) -> asyncio.Server:
    """Serve ``hook`` over the policy-socket protocol at ``path`` (a new socket)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(timeout):
                data = b""
                while not data.endswith(b"\n\n") and len(data) <= MAX_REQUEST:
                    chunk = await reader.read(4096)
                    if not chunk:
                        break
                    data += chunk
            decision = await evaluate(hook, PolicyRequest.parse(data), timeout=timeout)
        except (PolicyError, TimeoutError, ConnectionError) as e:
            log.warning("qrexec policy socket: bad request: %s", e)
            decision = PolicyDecision.denied()
        try:
            writer.write(decision.to_lines())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, os.fspath(path))


__all__ = [
    "PolicyDecision",
    "PolicyError",
    "PolicyHook",
    "PolicyProgram",
    "PolicyRequest",
    "PolicySocket",
    "Rule",
    "RulePolicy",
    "evaluate",
    "serve_policy_socket",
]
