"""Host side of the Xen lab: boot real Xen once per session and report every guest test.

The guest tier (``tests/xenlab/guest``) is listed here with ``pytest --collect-only`` (the
manifest), run inside dom0 in a single boot (:func:`xenlab.lab.boot`), and each guest test
becomes one host test that passes only if the guest's junit XML says it passed.  A guest
test that failed, errored, was skipped or never ran fails here; so does a run that produced
no results (boot failure, watchdog) or ran zero tests.  Nothing is skipped on the host:
missing packages are installed (``scripts/ensure-debs``, as root or via sudo).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

TREE = Path(__file__).resolve().parents[2]
GUEST_DIR = "tests/xenlab/guest"

pytestmark = [pytest.mark.xenlab, pytest.mark.timeout(2400)]


def _load_lab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("xenlab_lab", TREE / "xenlab" / "lab.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["xenlab_lab"] = module
    spec.loader.exec_module(module)
    return module


lab = _load_lab()


@functools.cache
def guest_manifest() -> list[str]:
    """Node ids of the guest tier, collected on the host."""
    env = dict(os.environ, AIOXEN_XENLAB_COLLECT="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *lab.GUEST_SELECTION],
        cwd=TREE, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    ids = [ln.strip() for ln in out.stdout.splitlines() if ln.startswith(GUEST_DIR + "/")]
    if out.returncode != 0 or not ids:
        raise RuntimeError(
            f"collecting {GUEST_DIR} failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}"
        )
    return ids


def junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) of ``nodeid`` as pytest's junit XML spells them.  The parameter
    part is split off first: it may hold ``::`` itself (the peer domU's node ids are
    the parameters of ``test_crossdomain.py::test_in_peer_domu``)."""
    path, bracket, params = nodeid.partition("[")
    parts = path.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[1:-1]]), parts[-1] + bracket + params


@dataclass
class Outcome:
    status: str  # passed | failed | error | skipped
    detail: str


def parse_junit(path: Path) -> dict[tuple[str, str], Outcome]:
    results: dict[tuple[str, str], Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        status, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = "failed" if tag == "failure" else tag
                detail = f"{el.get('message', '')}\n{el.text or ''}".strip()
                break
        if key in results and results[key].status != "passed":
            continue  # keep a call failure over a later teardown record
        if key in results and status == "passed":
            continue
        results[key] = Outcome(status, detail)
    return results


@dataclass
class LabResult:
    run: Any  # xenlab.lab.Run
    outcomes: dict[tuple[str, str], Outcome]
    problem: str | None


_EARLY: dict[str, Any] = {}


def start_in_background() -> None:
    """Boot the lab now in a background thread, so that Xen under QEMU runs while the
    host's other tests do (``conftest.pytest_collection_finish`` calls this once the
    selection holds this module's tests); ``lab_result`` then waits for that run.  A
    session that ends first kills QEMU on exit (``xenlab.lab._kill_live_qemu``)."""
    if "thread" in _EARLY:
        return

    def work() -> None:
        try:
            lab.ensure_debs()
            _EARLY["run"] = lab.boot()
        except BaseException as exc:  # re-raised in the session's thread by lab_result
            _EARLY["error"] = exc

    thread = threading.Thread(target=work, name="xenlab-boot", daemon=True)
    _EARLY["thread"] = thread
    thread.start()


def _lab_run() -> Any:
    thread = _EARLY.get("thread")
    if thread is None:
        lab.ensure_debs()
        return lab.boot()
    thread.join()
    if "error" in _EARLY:
        raise _EARLY["error"]
    return _EARLY["run"]


@pytest.fixture(scope="session")
def lab_result(lab_report: dict[str, Any]) -> LabResult:
    """One boot of Xen running the whole guest tier (started early if it could be)."""
    run = _lab_run()
    lab_report["run"] = run
    problem = None
    outcomes: dict[tuple[str, str], Outcome] = {}
    if run.pytest_rc is None or not run.junit.exists():
        problem = "the guest produced no pytest results:\n" + run.diagnosis()
    else:
        outcomes = parse_junit(run.junit)
    return LabResult(run, outcomes, problem)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "guest_test" in metafunc.fixturenames:
        ids = guest_manifest()
        metafunc.parametrize("guest_test", ids, ids=ids)


def test_guest(lab_result: LabResult, guest_test: str) -> None:
    if lab_result.problem:
        pytest.fail(lab_result.problem, pytrace=False)
    outcome = lab_result.outcomes.get(junit_key(guest_test))
    if outcome is None:
        log_tail = lab_result.run.pytest_log()[-3000:]
        pytest.fail(f"{guest_test} did not run in the guest\n{log_tail}", pytrace=False)
    if outcome.status != "passed":
        pytest.fail(f"in dom0 under Xen: {outcome.status}\n{outcome.detail}", pytrace=False)


def test_guest_run_complete(lab_result: LabResult) -> None:
    """The boot ran the whole manifest: >0 tests, nothing unexpected, pytest finished."""
    if lab_result.problem:
        pytest.fail(lab_result.problem, pytrace=False)
    manifest = {junit_key(i) for i in guest_manifest()}
    ran = set(lab_result.outcomes)
    assert ran, "the guest ran zero tests\n" + lab_result.run.pytest_log()[-3000:]
    assert ran <= manifest, f"guest ran tests the host did not list: {sorted(ran - manifest)}"
    assert manifest <= ran, f"guest did not run: {sorted(manifest - ran)}"
    assert lab_result.run.qemu_returncode == 0, lab_result.run.diagnosis()
    assert "WATCHDOG" not in lab_result.run.console
