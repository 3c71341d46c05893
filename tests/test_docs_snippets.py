"""Every code snippet in README.md and docs/*.md runs as written, or says why it cannot.

The runner reads each fenced block.  Blocks in ``python``/``py`` and in a shell language
(``sh``, ``bash``, ``shell``, ``console``) are *code*: each one is run, unless the line
right before its fence is a marker saying why not.  A block with no language at all is an
error (output, diagrams and synopses say ``text``), so code cannot hide in an unlabelled
block.  Markers are HTML comments, which mkdocs renders as nothing:

``<!-- not-runnable: REASON -->``
    not run; REASON must say why (real Xen, root, placeholders, runs forever, ...).
``<!-- run: session=NAME world=none timeout=SECONDS output=next -->``
    all options optional.  Blocks of one file with the same ``session`` run one after the
    other in the same world and directory (shell blocks as one ``bash -e`` script, Python
    blocks as one program).  ``world=none`` runs without a prepared world (no
    ``$XEN_ROOT``), for snippets that make their own.  ``output=next``: the next fenced
    block is the exact output the snippet must print (stdout; trailing blanks ignored).
    ``file=NAME`` (in a session): the block is not run but saved as ``NAME`` in the
    session's directory, for a later shell block to run (two programs, two domains).

Each run gets a fresh world: a private directory as ``$XEN_ROOT`` with its own
``aioxen xenstored`` (waited for through its export lines), ``$XENSTORED_PATH`` set, the
venv's ``bin`` first on ``$PATH``, a private working directory (also ``$TMPDIR``) and a
timeout.  Shell snippets run with ``bash -e``; in ``console`` blocks the lines starting
with ``$ `` are the commands, the rest is sample output.  Python snippets run like
``python -m asyncio`` runs them: a top-level ``await`` or ``async with`` is allowed.  The
snippet's whole process group (daemons it left in the background included) is killed
afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"sh", "bash", "shell", "console"}
DEFAULT_TIMEOUT = 30.0

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-runnable|run)\s*:(?P<body>.*?)-->\s*$")

# Runs a Python snippet the way `python -m asyncio` would: top-level await is allowed.
_PY_HARNESS = """\
import ast, asyncio, inspect, sys
path = sys.argv[1]
sys.argv = [path]
code = compile(open(path).read(), path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
ns = {"__name__": "__main__", "__file__": path}
if code.co_flags & inspect.CO_COROUTINE:
    asyncio.run(eval(code, ns))
else:
    exec(code, ns)
"""


class SnippetError(Exception):
    """A snippet or its marker is malformed (not a failed run)."""


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_runnable: str | None = None
    session: str | None = None
    world: bool = True
    timeout: float = DEFAULT_TIMEOUT
    output_next: bool = False
    file: str | None = None  # file=NAME: saved for the session's shell blocks, not run
    expected: str | None = None  # the output the snippet must print (output=next)

    @property
    def where(self) -> str:
        try:
            name = self.path.relative_to(REPO)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}"


@dataclasses.dataclass
class Unit:
    """One run: a single block, or the blocks of one session, in one fresh world."""

    blocks: list[Block]

    @property
    def run_blocks(self) -> list[Block]:
        """The blocks that are run (``file=`` blocks are only saved)."""
        return [b for b in self.blocks if b.file is None]

    @property
    def where(self) -> str:
        return self.blocks[0].where + (
            f" (session {self.blocks[0].session})" if self.blocks[0].session else ""
        )


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with its marker applied; errors raise."""
    lines = path.read_text().split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        info = m["info"].strip()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""
        ):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1
        lang = info.split()[0].lower() if info else ""
        where = f"{path}:{start + 1}"
        if not lang:
            raise SnippetError(f"{where}: a fenced block needs a language ('text' if not code)")
        block = Block(path, start + 1, lang, "\n".join(body) + "\n")
        marker = _MARKER.match(lines[start - 1]) if start > 0 else None
        if marker:
            if lang not in PYTHON_LANGS | SHELL_LANGS:
                raise SnippetError(f"{where}: a run marker on a {lang!r} block (not code)")
            body_text = marker["body"].strip()
            if marker["kind"] == "not-runnable":
                if len(body_text) < 8:
                    raise SnippetError(f"{where}: not-runnable needs a reason")
                block.not_runnable = body_text
            else:
                for opt in body_text.split():
                    key, _, value = opt.partition("=")
                    if key == "session" and value:
                        block.session = value
                    elif key == "world" and value in ("none", "fresh"):
                        block.world = value == "fresh"
                    elif key == "timeout" and value.replace(".", "", 1).isdigit():
                        block.timeout = float(value)
                    elif key == "output" and value == "next":
                        block.output_next = True
                    elif key == "file" and re.fullmatch(r"[\w.-]+", value):
                        block.file = value
                    else:
                        raise SnippetError(f"{where}: unknown run option {opt!r}")
        if blocks and blocks[-1].output_next and blocks[-1].expected is None:
            blocks[-1].expected = block.code
        blocks.append(block)
    for b in blocks:
        if b.output_next and (b.expected is None or b.session is not None):
            raise SnippetError(f"{b.where}: output=next needs a following block and no session")
        if b.file is not None and b.session is None:
            raise SnippetError(f"{b.where}: file= needs a session that runs it")
    return blocks


def units(paths: list[Path]) -> Iterator[Unit]:
    """The runs the snippets of ``paths`` make, in document order."""
    for path in paths:
        sessions: dict[str, Unit] = {}
        for block in parse_blocks(path):
            if block.lang not in PYTHON_LANGS | SHELL_LANGS or block.not_runnable:
                continue
            if block.session is None:
                yield Unit([block])
            else:
                sessions.setdefault(block.session, Unit([])).blocks.append(block)
        for unit in sessions.values():
            run = unit.run_blocks
            if not run:
                raise SnippetError(f"{unit.where}: a session with nothing to run")
            if len({b.lang in PYTHON_LANGS for b in run}) > 1:
                raise SnippetError(f"{unit.where}: a session mixes Python and shell")
            yield unit


def shell_script(block: Block) -> str:
    if block.lang != "console":
        return block.code
    commands: list[str] = []
    continued = False
    for line in block.code.split("\n"):
        if line.startswith("$ ") or continued:
            commands.append(line[2:] if line.startswith("$ ") else line)
            continued = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; give the rest of its group a moment, then make sure
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def start_world(work: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A fresh private root with its own ``aioxen xenstored``; sets XEN_ROOT/XENSTORED_PATH."""
    root, ready = work / "world", work / ".world.env"
    proc = subprocess.Popen(
        [str(BIN / "aioxen"), "xenstored", "--root", str(root), "--env-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30  # a hang guard only: it is ready in well under 1 s
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc)
            raise RuntimeError(f"aioxen xenstored did not start (rc {proc.returncode})")
        time.sleep(0.02)
    env["XEN_ROOT"] = str(root)
    env["XENSTORED_PATH"] = str(root / "xenstored" / "socket")
    return proc


def run_unit(unit: Unit, work: Path) -> subprocess.CompletedProcess[str]:
    """Run one unit in ``work`` (an empty private directory); never raises on failure."""
    run = unit.run_blocks
    first = run[0]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIOXEN_", "XEN_ROOT", "XENSTORED_", "PYTEST_"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["TMPDIR"] = str(work)
    env["PYTHONUNBUFFERED"] = "1"
    work.chmod(0o700)
    world = start_world(work, env) if all(b.world for b in unit.blocks) else None
    out, err = work / ".stdout", work / ".stderr"
    for b in unit.blocks:
        if b.file is not None:
            (work / b.file).write_text(b.code)
    if first.lang in PYTHON_LANGS:
        (work / "snippet.py").write_text("\n".join(b.code for b in run))
        argv = [sys.executable, "-c", _PY_HARNESS, str(work / "snippet.py")]
    else:
        (work / "snippet.sh").write_text("\n".join(shell_script(b) for b in run))
        argv = ["bash", "-e", str(work / "snippet.sh")]
    timeout = max(b.timeout for b in unit.blocks)
    try:
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                argv,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = -1
                e.write(f"\n[snippet runner: timed out after {timeout:g} s]\n".encode())
            finally:
                _kill_group(proc)
    finally:
        if world is not None:
            _kill_group(world)
    return subprocess.CompletedProcess(
        argv, rc, out.read_text(errors="replace"), err.read_text(errors="replace")
    )


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().split("\n")]


def check(unit: Unit, result: subprocess.CompletedProcess[str]) -> bool:
    """Did the run succeed (rc 0 and, with output=next, exactly the documented output)?"""
    expected = unit.blocks[0].expected
    if result.returncode != 0:
        return False
    return expected is None or _lines(result.stdout) == _lines(expected)


def describe_failure(unit: Unit, result: subprocess.CompletedProcess[str]) -> str:
    code = "\n".join(b.code for b in unit.blocks)
    if unit.blocks[0].expected is not None:
        code += f"--- documented output\n{unit.blocks[0].expected}"
    return (
        f"{unit.where}: exited {result.returncode}\n--- snippet\n{code}"
        f"--- stdout (tail)\n{result.stdout[-2000:]}\n--- stderr (tail)\n{result.stderr[-3000:]}"
    )


# -- the real docs ---------------------------------------------------------------------------

try:
    ALL_UNITS = list(units(DOC_FILES))
except SnippetError:  # reported by the test below
    ALL_UNITS = []


def test_every_block_is_labelled_and_every_marker_well_formed() -> None:
    blocks = [b for f in DOC_FILES for b in parse_blocks(f)]  # raises on a malformed one
    code = [b for b in blocks if b.lang in PYTHON_LANGS | SHELL_LANGS]
    assert code, "no code blocks found: the parser is broken"
    for b in code:
        assert b.not_runnable is None or b.session is None, b.where


@pytest.mark.parametrize("unit", ALL_UNITS, ids=[u.where for u in ALL_UNITS])
def test_snippet_runs_as_written(unit: Unit, tmp_path: Path) -> None:
    result = run_unit(unit, tmp_path)
    assert check(unit, result), describe_failure(unit, result)


# -- the runner itself -----------------------------------------------------------------------


def _doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(textwrap.dedent(text))
    return path


def _run_all(path: Path, tmp_path: Path) -> list[int]:
    rcs = []
    for n, unit in enumerate(units([path])):
        work = tmp_path / f"run{n}"
        work.mkdir()
        result = run_unit(unit, work)
        rcs.append(result.returncode if check(unit, result) or result.returncode else 99)
    return rcs


def test_runner_fails_a_broken_snippet(tmp_path: Path) -> None:
    page = _doc(
        tmp_path,
        """\
        ```sh
        true
        false
        echo not reached
        ```

        ```python
        raise SystemExit(3)
        ```

        ```console
        $ test -n "$XEN_ROOT"
        some output that is not run
        $ aioxen xenstore write /a 1 && aioxen xenstore read /nonexistent
        ```
        """,
    )
    assert _run_all(page, tmp_path) == [1, 3, 1]


def test_runner_passes_working_snippets_in_a_fresh_world(tmp_path: Path) -> None:
    page = _doc(
        tmp_path,
        """\
        ```console
        $ aioxen xenstore write /demo/a 1
        $ test "$(aioxen xenstore read /demo/a)" = 1
        output lines are ignored
        ```

        ```python
        import aioxen
        async with aioxen.platform() as plat:   # top-level await, as in python -m asyncio
            assert await plat.store.read("/demo/a") == b"1", "the world is not fresh"
        ```
        """,
    )
    # the second run has its own world: /demo/a is not there, so it must fail
    assert _run_all(page, tmp_path) == [0, 1]


def test_sessions_share_a_world_and_world_none_has_none(tmp_path: Path) -> None:
    page = _doc(
        tmp_path,
        """\
        <!-- run: session=s -->
        ```sh
        aioxen xenstore write /demo/a 1
        touch here
        ```

        <!-- not-runnable: this one is skipped, it would fail -->
        ```sh
        false
        ```

        <!-- run: session=s -->
        ```sh
        test "$(aioxen xenstore read /demo/a)" = 1 && test -e here
        ```

        <!-- run: world=none -->
        ```sh
        test -z "${XEN_ROOT:-}"
        ```

        <!-- run: session=two file=server.py -->
        ```python
        import sys; sys.exit(int(sys.argv[1]))
        ```

        <!-- run: session=two -->
        ```sh
        python server.py 0 && ! python server.py 4
        ```
        """,
    )
    assert _run_all(page, tmp_path) == [0, 0, 0]


def test_runner_times_out_and_kills_background_daemons(tmp_path: Path) -> None:
    page = _doc(
        tmp_path,
        """\
        <!-- run: timeout=2 -->
        ```sh
        sleep 1000 &
        echo $! > daemon.pid
        sleep 1000
        ```
        """,
    )
    start = time.monotonic()
    assert _run_all(page, tmp_path) == [-1]
    assert time.monotonic() - start < 20
    pid = int((tmp_path / "run0" / "daemon.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_documented_output_is_checked(tmp_path: Path) -> None:
    page = _doc(
        tmp_path,
        """\
        <!-- run: output=next -->
        ```python
        print("vif", 1 + 1)
        ```

        ```text
        vif 2
        ```

        <!-- run: output=next -->
        ```sh
        echo vif 3
        ```

        ```text
        vif 2
        ```
        """,
    )
    assert _run_all(page, tmp_path) == [0, 99]  # 99: rc 0 but not the documented output


@pytest.mark.parametrize(
    "text, message",
    [
        ("```\nls\n```\n", "needs a language"),
        ("<!-- not-runnable: -->\n```sh\nls\n```\n", "needs a reason"),
        ("<!-- run: sesion=x -->\n```sh\nls\n```\n", "unknown run option"),
        ("<!-- not-runnable: it is output -->\n```text\nls\n```\n", "not code"),
        ("<!-- run: file=x.py -->\n```python\npass\n```\n", "needs a session"),
        ("<!-- run: session=a file=x.py -->\n```python\npass\n```\n", "nothing to run"),
    ],
)
def test_malformed_blocks_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SnippetError, match=message):
        list(units([_doc(tmp_path, text)]))
