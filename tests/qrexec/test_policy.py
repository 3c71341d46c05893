"""qrexec policy hooks: the policy-socket line protocol, a policy program, rule tables;
a broken policy denies."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from aioxen.qrexec.policy import (
    PolicyDecision,
    PolicyError,
    PolicyProgram,
    PolicyRequest,
    PolicySocket,
    RulePolicy,
    evaluate,
    serve_policy_socket,
)

REQ = PolicyRequest("work", "vault", "my.Service+arg")
ALLOW = b"result=allow\nuser=toto\ntarget=vault\nrequested_target=vault\nautostart=True\n"


def test_request_lines_round_trip() -> None:
    assert REQ.to_lines() == (
        b"source=work\nintended_target=vault\nservice_and_arg=my.Service+arg\n\n"
    )
    assert PolicyRequest.parse(REQ.to_lines()) == REQ
    r = PolicyRequest("a", "b", "s", requested_source="c")
    assert PolicyRequest.parse(r.to_lines()) == r
    assert (REQ.service_name, REQ.argument) == ("my.Service", "arg")


def test_answer_parsing_is_strict() -> None:
    d = PolicyDecision.parse(ALLOW)
    assert (d.allow, d.user, d.target, d.autostart) == (True, "toto", "vault", True)
    assert PolicyDecision.parse(d.to_lines()) == d
    assert PolicyDecision.parse(b"result=deny\n") == PolicyDecision.denied()
    assert PolicyDecision.parse(ALLOW + b"unknown=1\n").allow  # unknown keys ignored
    for bad in (
        b"",
        b"result=maybe\n",
        b"result=allow\n",  # no user/target/...
        b"result=deny\nuser=x\n",
        ALLOW + b"user=again\n",
        ALLOW + b"no equals sign\n",
        ALLOW.replace(b"True", b"yes"),
        ALLOW + b"x=\0\n",
    ):
        with pytest.raises(PolicyError):
            PolicyDecision.parse(bad)


async def test_evaluate_denies_on_any_failure() -> None:
    def boom(r: PolicyRequest) -> bool:
        raise RuntimeError("policy bug")

    async def yes(r: PolicyRequest) -> bool:
        return True

    assert not (await evaluate(boom, REQ)).allow
    assert not (await evaluate(None, REQ)).allow
    assert not (await evaluate(lambda r: "yes", REQ)).allow  # type: ignore[arg-type,return-value]
    d = await evaluate(yes, REQ)
    assert (d.allow, d.target, d.user) == (True, "vault", "user")
    d = await evaluate(lambda r: True, PolicyRequest("work", "@adminvm", "x"))
    assert d.target == "dom0"


def test_rule_policy() -> None:
    policy = RulePolicy.parse(
        """
        # comment
        my.Echo   *      work   vault   allow
        my.Echo   +sec   *      *       deny
        my.Redir  *      @anyvm @default allow target=vault user=root
        my.Admin  *      work   dom0    allow
        my.Ask    *      *      *       ask
        """
    )
    assert policy(PolicyRequest("work", "vault", "my.Echo+x")).allow
    assert not policy(PolicyRequest("other", "vault", "my.Echo+sec")).allow
    assert not policy(PolicyRequest("other", "vault", "my.Echo")).allow  # no rule
    d = policy(PolicyRequest("work", "@default", "my.Redir"))
    assert (d.allow, d.target, d.user, d.requested_target) == (True, "vault", "root", "@default")
    assert policy(PolicyRequest("work", "@adminvm", "my.Admin")).target == "dom0"
    assert not policy(PolicyRequest("work", "vault", "my.Ask")).allow
    for bad in ("a b c d", "a * b c maybe", "a x b c allow", "a * b c allow color=red"):
        with pytest.raises(ValueError, match="<policy>:1"):
            RulePolicy.parse(bad)


async def test_policy_program(tmp_path: Path) -> None:
    prog = tmp_path / "policy-exec"
    prog.write_text(
        "#!/bin/sh\n"
        'echo "$@" > "$0.args"\n'
        'if [ "$4" = "my.Ok" ]; then printf "result=allow\\nuser=u\\ntarget=%s\\n'
        'requested_target=%s\\nautostart=True\\n" "$3" "$3"; exit 0; fi\n'
        'if [ "$4" = "my.Fail" ]; then exit 3; fi\n'
        "echo result=deny\n"
    )
    prog.chmod(0o700)
    hook = PolicyProgram(prog)
    d = await evaluate(hook, PolicyRequest("work", "vault", "my.Ok"))
    assert (d.allow, d.user, d.target) == (True, "u", "vault")
    assert (tmp_path / "policy-exec.args").read_text() == "-- work vault my.Ok\n"
    assert not (await evaluate(hook, PolicyRequest("work", "vault", "my.No"))).allow
    assert not (await evaluate(hook, PolicyRequest("work", "vault", "my.Fail"))).allow


async def test_policy_socket_both_sides() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "policy.sock")
        seen: list[PolicyRequest] = []

        def hook(r: PolicyRequest) -> bool:
            seen.append(r)
            return r.service == "my.Ok"

        server = await serve_policy_socket(hook, path)
        async with server:
            sock = PolicySocket(path)
            d1 = await evaluate(sock, PolicyRequest("work", "vault", "my.Ok"))
            d2 = await evaluate(sock, PolicyRequest("work", "vault", "my.No"))
            assert (d1.allow, d1.target, d2.allow) == (True, "vault", False)
            assert [r.service for r in seen] == ["my.Ok", "my.No"]
            server.close()
        # nothing listening: denied, not an exception
        assert not (await evaluate(PolicySocket(path), REQ)).allow
