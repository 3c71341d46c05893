"""The one CLI standard (:mod:`aioxen.apps.clistd`, applied by :func:`aioxen.cli.main`),
checked on every command.

* every subcommand's ``--help`` (discovered from the parser: a new command is covered
  without touching this file): exit 0, no raw reST markup, every option and subcommand
  has a help text;
* a table of bad inputs (:data:`BAD_INPUTS`, real processes): the exit status (2 usage,
  1 runtime), stderr starting with ``aioxen CMD:``, no traceback, a short message, and no
  I/O -- the root and working directory the row points at stay untouched.  Rows for more
  commands are welcome: append to the table;
* ``--debug`` (before or after the subcommand, or ``$AIOXEN_DEBUG``) adds the traceback.

Signals and readiness of the long-running commands are in ``test_cli_daemons.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aioxen.cli import build_parser, walk_parsers

AIOXEN = [sys.executable, "-m", "aioxen"]
LONG_PORT = "p" * 4000

# -- every --help ------------------------------------------------------------------------


def _all_parsers() -> list[argparse.ArgumentParser]:
    return list(walk_parsers(build_parser()))


def _argv_of(parser: argparse.ArgumentParser) -> list[str]:
    return parser.prog.split()[1:]


PARSERS = {p.prog: p for p in _all_parsers()}
RAW_MARKUP = re.compile(r"``|:(func|class|mod|meth|attr|data|exc|ref):|`[^`\s]")


def test_the_walk_finds_every_command() -> None:
    """The discovery really descends (so the tests below cover every command)."""
    names = set(PARSERS)
    for expected in (
        "aioxen",
        "aioxen xenstored",
        "aioxen xenstore read",
        "aioxen xenstore watch",
        "aioxen cat",
        "aioxen bridge",
        "aioxen device rm",
        "aioxen console",
        "aioxen bench",
        "aioxen blkback",
        "aioxen netback",
    ):
        assert expected in names, sorted(names)


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_help(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` exits 0, shows no raw markup, and every option/subcommand has help."""
    from aioxen.cli import main

    parser = PARSERS[prog]
    with pytest.raises(SystemExit) as exit_info:
        main([*_argv_of(parser), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog}")
    assert not RAW_MARKUP.search(out), RAW_MARKUP.search(out)
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest for a in action._choices_actions if a.help}
            missing += [f"subcommand {n}" for n in action.choices if n not in listed]
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append("/".join(action.option_strings) or action.dest)
    assert missing == [], f"{prog}: no help for {missing}"


def test_help_of_the_real_program() -> None:
    """The same through a real process (the console script's own exit status)."""
    p = subprocess.run([*AIOXEN, "--help"], capture_output=True, timeout=60)
    assert p.returncode == 0 and b"--debug" in p.stdout and p.stderr == b""


# -- bad inputs ------------------------------------------------------------------------

# (id, argv, expected status, stderr prefix, text stderr must contain, extra environment)
# In argv and env, {tmp} is the test's directory, {file} a regular file in it, {root} a
# root path that must never be created, {sock} a socket path that does not exist.
BAD_INPUTS: list[tuple[str, list[str], int, str, str, dict[str, str]]] = [
    ("no-command", [], 2, "aioxen:", "COMMAND", {}),
    ("unknown-command", ["frobnicate"], 2, "aioxen:", "invalid choice", {}),
    ("unknown-option", ["xenstored", "--bogus"], 2, "aioxen xenstored:", "--bogus", {}),
    # xenstored
    ("xenstored-no-root", ["xenstored"], 2, "aioxen xenstored:", "--root", {"XEN_ROOT": ""}),
    (
        "xenstored-root-file",
        ["xenstored", "--root", "{file}"],
        1,
        "aioxen xenstored:",
        "not a directory",
        {},
    ),
    (
        "xenstored-root-proc",
        ["xenstored", "--root", "/proc/aioxen-nonexistent"],
        1,
        "aioxen xenstored:",
        "/proc/aioxen-nonexistent",
        {},
    ),
    (
        "xenstored-quota-value",
        ["xenstored", "--root", "{root}", "--quota", "node_size=x"],
        2,
        "aioxen xenstored:",
        "node-size",
        {},
    ),
    (
        "xenstored-quota-name",
        ["xenstored", "--root", "{root}", "--quota", "bogus=1"],
        2,
        "aioxen xenstored:",
        "node-size",
        {},
    ),
    (
        "xenstored-ready-fd",
        ["xenstored", "--root", "{root}", "--ready-fd", "1"],
        2,
        "aioxen xenstored:",
        "3 or above",
        {},
    ),
    (
        "xenstored-ready-fd-closed",
        ["xenstored", "--root", "{root}", "--ready-fd", "77"],
        2,
        "aioxen xenstored:",
        "Bad file descriptor",
        {},
    ),
    # xenstore
    (
        "xenstore-domid",
        ["xenstore", "--domid", "70000", "read", "/"],
        2,
        "aioxen xenstore:",
        "out of range",
        {},
    ),
    (
        "xenstore-domid-env",
        ["xenstore", "read", "/"],
        2,
        "aioxen xenstore:",
        "domid",
        {"AIOXEN_DOMID": "dom0"},
    ),
    (
        "xenstore-timeout-neg",
        ["xenstore", "--timeout", "-1", "read", "/"],
        2,
        "aioxen xenstore:",
        "positive",
        {},
    ),
    (
        "xenstore-timeout-zero",
        ["xenstore", "--timeout", "0", "read", "/"],
        2,
        "aioxen xenstore:",
        "positive",
        {},
    ),
    (
        "xenstore-perm",
        ["xenstore", "perms", "/x", "q9"],
        2,
        "aioxen xenstore perms:",
        "'q9'",
        {},
    ),
    (
        "xenstore-write-odd",
        ["xenstore", "write", "/a"],
        2,
        "aioxen xenstore write:",
        "pairs",
        {},
    ),
    (
        "xenstore-watch-count",
        ["xenstore", "watch", "/", "-n", "-1"],
        2,
        "aioxen xenstore watch:",
        "out of range",
        {},
    ),
    ("xenstore-no-op", ["xenstore"], 2, "aioxen xenstore:", "OPERATION", {}),
    (
        "xenstore-no-socket",
        ["xenstore", "read", "/x"],
        1,
        "aioxen xenstore read:",
        "no xenstored socket",
        {},
    ),
    # cat
    ("cat-long-port", ["cat", "0", LONG_PORT], 2, "aioxen cat:", "at most 64", {}),
    ("cat-bad-port", ["cat", "0", "a/b"], 2, "aioxen cat:", "[A-Za-z0-9_-]+", {}),
    ("cat-domid", ["cat", "70000", "foo"], 2, "aioxen cat:", "out of range", {}),
    ("cat-domid-self", ["cat", "0x7ff0", "foo"], 2, "aioxen cat:", "out of range", {}),
    ("cat-timeout", ["cat", "0", "foo", "--timeout", "-1"], 2, "aioxen cat:", "positive", {}),
    (
        "cat-size",
        ["cat", "0", "foo", "--buffer-size", "0"],
        2,
        "aioxen cat:",
        "out of range",
        {},
    ),
    (
        "cat-root-file",
        ["cat", "0", "foo"],
        1,
        "aioxen cat:",
        "is not a directory",
        {"XEN_ROOT": "{file}"},
    ),
    (
        "cat-root-missing",
        ["cat", "0", "foo"],
        1,
        "aioxen cat:",
        "no such directory",
        {"XEN_ROOT": "{root}/deeper"},
    ),
    (
        "cat-listen-env-domid",
        ["cat", "-l", "2", "foo"],
        2,
        "aioxen cat:",
        "$AIOXEN_DOMID",
        {"AIOXEN_DOMID": "x", "AIOXEN_PLATFORM": "", "TMPDIR": "{root}"},
    ),
    (
        "cat-env-domid",
        ["cat", "0", "foo"],
        2,
        "aioxen cat:",
        "$AIOXEN_DOMID",
        {"AIOXEN_DOMID": "99999", "XEN_ROOT": "{tmp}"},
    ),
    # bridge
    (
        "bridge-garbage",
        ["bridge", "--listen", "garbage", "--connect", "tcp:127.0.0.1:1"],
        2,
        "aioxen bridge:",
        "expected tcp:HOST:PORT",
        {},
    ),
    (
        "bridge-port-range",
        ["bridge", "--listen", "tcp:127.0.0.1:0", "--connect", "127.0.0.1:99999"],
        2,
        "aioxen bridge:",
        "out of range",
        {},
    ),
    (
        "bridge-connect-port-0",
        ["bridge", "--listen", "127.0.0.1:0", "--connect", "tcp:127.0.0.1:0"],
        2,
        "aioxen bridge:",
        "1..65535",
        {},
    ),
    (
        "bridge-v6-brackets",
        ["bridge", "--listen", "tcp:::1:80", "--connect", "tcp:127.0.0.1:1"],
        2,
        "aioxen bridge:",
        "brackets",
        {},
    ),
    (
        "bridge-long-vchan-port",
        ["bridge", "--listen", "tcp:127.0.0.1:0", "--connect", f"vchan:0/{LONG_PORT}"],
        2,
        "aioxen bridge:",
        "at most 64",
        {},
    ),
    (
        "bridge-vchan-domid",
        ["bridge", "--listen", "vchan:70000/web", "--connect", "tcp:127.0.0.1:1"],
        2,
        "aioxen bridge:",
        "out of range",
        {},
    ),
    (
        "bridge-grace",
        ["bridge", "--listen", "tcp:127.0.0.1:0", "--connect", "tcp:127.0.0.1:1", "--grace", "-1"],
        2,
        "aioxen bridge:",
        "positive",
        {},
    ),
    (
        "bridge-max-connections",
        [
            "bridge",
            "--listen",
            "tcp:127.0.0.1:0",
            "--connect",
            "tcp:127.0.0.1:1",
            "--max-connections",
            "0",
        ],
        2,
        "aioxen bridge:",
        "--max-connections",
        {},
    ),
    (
        "bridge-root-file",
        ["bridge", "--listen", "vchan:2/web", "--connect", "tcp:127.0.0.1:1"],
        1,
        "aioxen bridge:",
        "is not a directory",
        {"XEN_ROOT": "{file}"},
    ),
    # device
    (
        "device-add-domid",
        ["device", "add", "vif", "70000"],
        2,
        "aioxen device add:",
        "out of range",
        {},
    ),
    (
        "device-add-key",
        ["device", "add", "vif", "1", "--key", "novalue"],
        2,
        "aioxen device add:",
        "K=V",
        {},
    ),
    (
        "device-add-type",
        ["device", "add", "a/b", "1"],
        2,
        "aioxen device add:",
        "device type",
        {},
    ),
    (
        "device-rm-timeout",
        ["device", "rm", "vif", "1", "--timeout", "0"],
        2,
        "aioxen device rm:",
        "positive",
        {},
    ),
    (
        "device-rm-devid",
        ["device", "rm", "vif", "1", "--devid", "-1"],
        2,
        "aioxen device rm:",
        "out of range",
        {},
    ),
    ("device-ls-domid", ["device", "ls", "foo"], 2, "aioxen device ls:", "domid", {}),
    (
        "device-ls-root-file",
        ["device", "ls"],
        1,
        "aioxen device ls:",
        "is not a directory",
        {"XEN_ROOT": "{file}"},
    ),
    (
        "device-ls-root-missing",
        ["device", "ls"],
        1,
        "aioxen device ls:",
        "no such directory",
        {"XEN_ROOT": "{root}"},
    ),
    # console
    ("console-domid", ["console", "70000"], 2, "aioxen console:", "out of range", {}),
    (
        "console-timeout",
        ["console", "1", "--timeout", "-5"],
        2,
        "aioxen console:",
        "positive",
        {},
    ),
    (
        "console-root-file",
        ["console", "1"],
        1,
        "aioxen console:",
        "is not a directory",
        {"XEN_ROOT": "{file}"},
    ),
    # blkback / blkfront / netback / netfront (more rows: tests/blk/test_blk_cli_errors.py,
    # tests/net/test_net_cli_errors.py)
    (
        "blkback-image-missing",
        ["blkback", "--image", "{tmp}/no.img", "--frontend", "5"],
        2,
        "aioxen blkback:",
        "no such file",
        {},
    ),
    (
        "blkback-image-dir",
        ["blkback", "--image", "{tmp}", "--frontend", "5"],
        2,
        "aioxen blkback:",
        "is a directory",
        {},
    ),
    (
        "blkback-image-partial",
        ["blkback", "--image", "{file}", "--frontend", "5"],
        1,
        "aioxen blkback:",
        "not a whole number of 512-byte sectors",
        {},
    ),
    (
        "blkback-devid",
        ["blkback", "--image", "{file}", "--frontend", "5", "--devid", "foo"],
        2,
        "aioxen blkback:",
        "--devid",
        {},
    ),
    (
        "blkback-frontend",
        ["blkback", "--image", "{file}", "--frontend", "70000"],
        2,
        "aioxen blkback:",
        "domid 70000",
        {},
    ),
    (
        "blkfront-listen",
        ["blkfront", "nbd", "--listen", "garbage", "xvda"],
        2,
        "aioxen blkfront nbd:",
        "--listen",
        {},
    ),
    (
        "blkfront-listen-port",
        ["blkfront", "nbd", "--listen", "127.0.0.1:99999", "xvda"],
        2,
        "aioxen blkfront nbd:",
        "99999",
        {},
    ),
    (
        "netback-frontend",
        ["netback", "--frontend", "70000", "--switch"],
        2,
        "aioxen netback:",
        "domid 70000",
        {},
    ),
    (
        "netback-no-tap-or-switch",
        ["netback", "--frontend", "5"],
        2,
        "aioxen netback:",
        "--switch",
        {},
    ),
    (
        "netfront-timeout",
        ["netfront", "--tap", "t0", "--timeout", "0"],
        2,
        "aioxen netfront:",
        "--timeout",
        {},
    ),
    # blk / net (their specific checks: tests/blk, tests/net)
    (
        "blkback-image-missing",
        ["blkback", "--image", "{tmp}/none.img", "--frontend", "1"],
        2,
        "aioxen blkback:",
        "none.img",
        {},
    ),
    (
        "blkback-image-dir",
        ["blkback", "--image", "{tmp}", "--frontend", "1"],
        2,
        "aioxen blkback:",
        "directory",
        {},
    ),
    (
        "blkback-frontend",
        ["blkback", "--image", "{file}", "--frontend", "70000"],
        2,
        "aioxen blkback:",
        "out of range",
        {},
    ),
    (
        "blkback-devid",
        ["blkback", "--image", "{file}", "--frontend", "1", "--devid", "foo"],
        2,
        "aioxen blkback:",
        "--devid",
        {},
    ),
    (
        "blkfront-listen-port",
        ["blkfront", "nbd", "xvdq", "--listen", "127.0.0.1:99999"],
        2,
        "aioxen blkfront nbd:",
        "out of range",
        {},
    ),
    (
        "blkfront-listen-garbage",
        ["blkfront", "nbd", "xvdq", "--listen", "garbage"],
        2,
        "aioxen blkfront nbd:",
        "expected tcp:HOST:PORT",
        {},
    ),
    (
        "netback-frontend",
        ["netback", "--frontend", "70000"],
        2,
        "aioxen netback:",
        "out of range",
        {},
    ),
    (
        "netfront-timeout",
        ["netfront", "--tap", "x", "--timeout", "0"],
        2,
        "aioxen netfront:",
        "positive",
        {},
    ),
    # bench
    ("bench-loop", ["bench", "--loop", "nope"], 2, "aioxen bench:", "invalid choice", {}),
    ("bench-suite", ["bench", "nosuch"], 2, "aioxen bench:", "unknown suite(s): nosuch", {}),
]


def _fill(text: str, tmp: Path) -> str:
    return text.format(
        tmp=tmp, file=tmp / "afile", root=tmp / "never-created", sock=tmp / "no-socket"
    )


@pytest.mark.parametrize(
    ("argv", "status", "prefix", "says", "env"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS],
)
def test_bad_input(
    tmp_path: Path, argv: list[str], status: int, prefix: str, says: str, env: dict[str, str]
) -> None:
    (tmp_path / "afile").write_text("not a directory\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XEN_ROOT", "AIOXEN_PLATFORM", "AIOXEN_DOMID", "AIOXEN_DEBUG")
    }
    environ["XENSTORED_PATH"] = str(tmp_path / "no-socket")
    environ["AIOXEN_PLATFORM"] = "unix"  # never the host's Xen, whatever the machine is
    environ.update({k: _fill(v, tmp_path) for k, v in env.items()})
    for name in ("XEN_ROOT", "AIOXEN_PLATFORM"):
        if not environ.get(name):
            environ.pop(name, None)
    p = subprocess.run(
        [*AIOXEN, *(_fill(a, tmp_path) if "{" in a else a for a in argv)],
        capture_output=True,
        timeout=60,
        cwd=cwd,
        env=environ,
        stdin=subprocess.DEVNULL,
    )
    err = p.stderr.decode(errors="replace")
    assert p.returncode == status, err
    assert err.startswith(prefix + " "), err
    assert says in err, err
    assert "Traceback" not in err and "never retrieved" not in err, err
    assert len(err) < 1500, f"{len(err)} characters of stderr"  # no 4 KB echo
    assert p.stdout == b""
    # No I/O: nothing created where the row pointed, nothing in the working directory.
    assert not (tmp_path / "never-created").exists()
    assert list(cwd.iterdir()) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == ["afile", "cwd"]


# -- --debug ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["before", "after", "env", "none"], ids=lambda h: f"debug-{h}")
def test_debug_shows_the_traceback(tmp_path: Path, how: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "AIOXEN_DEBUG"}
    env.update(XEN_ROOT=str(afile), AIOXEN_PLATFORM="unix")
    argv = ["device", "ls"]
    if how == "before":
        argv = ["--debug", *argv]
    elif how == "after":
        argv = [*argv, "--debug"]
    elif how == "env":
        env["AIOXEN_DEBUG"] = "1"
    p = subprocess.run([*AIOXEN, *argv], capture_output=True, timeout=60, env=env)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert (
        err.rstrip().splitlines()[-1] == f"aioxen device ls: $XEN_ROOT={afile} is not a directory"
    )
    assert ("Traceback (most recent call last)" in err) == (how != "none"), err
