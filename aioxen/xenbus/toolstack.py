"""The toolstack step that creates, removes and lists xenbus devices (``xl`` style).

Theory of operation
-------------------
On Xen, ``xl``/libxl (``libxl_device.c``) creates a split device by writing two
directories in one transaction, each owned by the domain at that end and readable by the
other::

    /local/domain/F/device/T/N          backend=<backend dir>  backend-id=B  state=1
                                        perms: n<F> r<B>
    /local/domain/B/backend/T/F/N       frontend=<frontend dir>  frontend-id=F  online=1  state=1
                                        perms: n<B> r<F>

plus device specific keys on either side.  The two drivers then take it from there
(`aioxen.xenbus.driver`).  The domains' home directories are created owned by their
domain if missing (what building a domain does).  Removal follows libxl: set the back
end's ``online=0`` and ``state=Closing``, wait (bounded) for the back end to reach
``Closed``, then remove both directories; ``force`` removes them at once.  The caller
needs the rights of a toolstack (dom0 on Xen; any process acting as domain 0 on
``unix``/``inheap``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aioxen.errors import ProtocolError
from aioxen.platforms.base import check_domid
from aioxen.xenbus.claim import OWNER_KEY, Claim, DeviceInUse, holder_alive, read_holder
from aioxen.xenbus.driver import backend_dir, frontend_dir, read_int, read_opt
from aioxen.xenbus.state import XenbusState, parse_state

if TYPE_CHECKING:
    from aioxen.xenstore.client import XenStoreClient

S = XenbusState


@dataclass(frozen=True)
class DeviceInfo:
    """A device as found in XenStore."""

    type: str
    devid: int
    frontend_domid: int
    backend_domid: int
    frontend_dir: str
    backend_dir: str
    frontend_state: XenbusState | None
    backend_state: XenbusState | None
    online: bool | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _check_type(type_: str) -> str:
    if not type_ or not all(c.isalnum() or c in "-_" for c in type_):
        raise ValueError(f"device type {type_!r} must match [A-Za-z0-9_-]+")
    return type_


async def _ensure_home(tx: Any, domid: int) -> None:
    home = f"/local/domain/{domid}"
    if await read_opt(tx, home) is None:
        await tx.mkdir(home)
        await tx.set_perms(home, [f"n{domid}"])
        await tx.write(f"{home}/domid", str(domid))


async def add_device(
    store: XenStoreClient,
    type_: str,
    frontend_domid: int,
    backend_domid: int,
    devid: int = 0,
    *,
    frontend_keys: Mapping[str, str] | None = None,
    backend_keys: Mapping[str, str] | None = None,
    replace: bool = False,
    claim: Claim | None = None,
) -> DeviceInfo:
    """Create device ``type_/devid`` between the two domains (both directories, their
    permissions and the toolstack keys).  ``FileExistsError`` if it exists, unless
    ``replace`` (which resets it to state Initialising).

    With ``claim`` (a `Claim` on the back end directory) the
    device is created already claimed, in the same transaction: if a live process holds
    the back end, [`DeviceInUse`][aioxen.xenbus.claim.DeviceInUse] is raised and nothing is
    changed (a dead holder's device is replaced).  Without ``claim`` a back end held by a
    live process is refused the same way.  A live front end's owner record survives a
    replace (the front end sees its device reset, and still owns it)."""
    _check_type(type_)
    check_domid(frontend_domid, "frontend_domid")
    check_domid(backend_domid, "backend_domid")
    if devid < 0:
        raise ValueError(f"device number {devid} must not be negative")
    fdir = frontend_dir(frontend_domid, type_, devid)
    bdir = backend_dir(backend_domid, type_, frontend_domid, devid)
    fe, be = frontend_domid, backend_domid
    front = {"backend": bdir, "backend-id": str(be), "state": S.INITIALISING.wire}
    back = {"frontend": fdir, "frontend-id": str(fe), "online": "1",
            "state": S.INITIALISING.wire}  # fmt: skip
    front.update(frontend_keys or {})
    back.update(backend_keys or {})

    if claim is not None and claim.directory != bdir:
        raise ValueError(f"{claim!r} is not a claim on {bdir}")

    async def body(tx: Any) -> None:
        if claim is not None:
            await claim.take_in(tx, require_dir=False)  # DeviceInUse: nothing written
        else:  # replacing under a live back end would pull the device from under it
            holder = await read_holder(tx, bdir)
            if holder is not None and holder_alive(holder):
                raise DeviceInUse(
                    f"device {type_}/{devid}: {bdir} is held by {holder.describe()}; stop it first",
                    holder,
                )
        front_holder = await read_holder(tx, fdir)  # a live front end keeps its claim
        if front_holder is not None and not holder_alive(front_holder):
            front_holder = None
        if not replace:
            for d in (fdir, bdir):
                if await read_opt(tx, d) is not None:
                    raise FileExistsError(f"device {type_}/{devid} already exists at {d}")
        await _ensure_home(tx, fe)
        await _ensure_home(tx, be)
        for d, keys, owner, peer in ((fdir, front, fe, be), (bdir, back, be, fe)):
            with contextlib.suppress(FileNotFoundError):
                await tx.rm(d)
            await tx.mkdir(d)
            await tx.set_perms(d, [f"n{owner}", f"r{peer}"])
            for k, v in keys.items():
                await tx.write(f"{d}/{k}", v)
                await tx.set_perms(f"{d}/{k}", [f"n{owner}", f"r{peer}"])
        if claim is not None:
            await tx.write(claim.key, claim.record.encode())
        if front_holder is not None:
            await tx.write(f"{fdir}/{OWNER_KEY}", front_holder.encode())

    await store.transact(body)
    return DeviceInfo(type_, devid, fe, be, fdir, bdir, S.INITIALISING, S.INITIALISING, True)


async def remove_device(
    store: XenStoreClient,
    type_: str,
    frontend_domid: int,
    backend_domid: int,
    devid: int = 0,
    *,
    force: bool = False,
    timeout: float = 10.0,
    claim: Claim | None = None,
) -> bool:
    """Remove device ``type_/devid``.  Unless ``force``, ask the back end to close first
    (``online=0``, ``state=Closing``) and wait up to ``timeout`` seconds for ``Closed``.
    Returns whether the close was orderly; ``FileNotFoundError`` if there is no device.

    With ``claim`` (the caller's claim on the back end directory) the device is removed
    only while the claim still holds: one that another process took over is left alone
    (and ``False`` returned)."""
    _check_type(type_)
    fdir = frontend_dir(frontend_domid, type_, devid)
    bdir = backend_dir(backend_domid, type_, frontend_domid, devid)
    if claim is not None:
        if claim.directory != bdir:
            raise ValueError(f"{claim!r} is not a claim on {bdir}")
        return await _remove_claimed(store, claim, fdir, bdir)
    if await read_opt(store, fdir) is None and await read_opt(store, bdir) is None:
        raise FileNotFoundError(
            f"no {type_} device {devid} between front end domain {frontend_domid} and back "
            f"end domain {backend_domid} ({fdir}, {bdir})"
        )
    orderly = False
    if not force and await read_opt(store, f"{bdir}/state") is not None:
        await store.write(f"{bdir}/online", "0")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), store.watch(f"{bdir}/state") as w:
                state = parse_state(await read_opt(store, f"{bdir}/state"), f"{bdir}/state")
                if state not in (S.CLOSED, S.CLOSING, None):
                    await store.write(f"{bdir}/state", S.CLOSING.wire)
                while True:
                    state = parse_state(await read_opt(store, f"{bdir}/state"), f"{bdir}/state")
                    if state in (S.CLOSED, None, S.UNKNOWN):
                        orderly = True
                        break
                    await w.next()
    for d in (bdir, fdir):
        with contextlib.suppress(FileNotFoundError):
            await store.rm(d)
    return orderly


async def _remove_claimed(store: XenStoreClient, claim: Claim, fdir: str, bdir: str) -> bool:
    """Remove both directories in one transaction, if ``claim`` still holds ``bdir``."""

    async def body(tx: Any) -> bool:
        if not await claim.held_in(tx):
            return False
        for d in (bdir, fdir):
            with contextlib.suppress(FileNotFoundError):
                await tx.rm(d)
        return True

    return await store.transact(body)


async def _ints(store: XenStoreClient, path: str) -> list[int]:
    try:
        names = await store.directory(path)
    except (FileNotFoundError, PermissionError):
        return []
    return sorted(int(n) for n in names if n.isdigit())


async def _info(
    store: XenStoreClient, type_: str, fe: int, be: int, devid: int, fdir: str, bdir: str
) -> DeviceInfo:
    async def state(d: str) -> XenbusState | None:
        if not d:
            return None
        try:
            return parse_state(await read_opt(store, f"{d}/state"), f"{d}/state")
        except Exception:
            return S.UNKNOWN

    online = await read_opt(store, f"{bdir}/online") if bdir else None
    return DeviceInfo(
        type_, devid, fe, be, fdir, bdir, await state(fdir), await state(bdir),
        None if online is None else online.strip() == b"1",
    )  # fmt: skip


async def list_devices(store: XenStoreClient, domid: int | None = None) -> list[DeviceInfo]:
    """Devices whose front or back end is ``domid`` (every domain's if ``None``)."""
    doms = [domid] if domid is not None else await _ints(store, "/local/domain")
    seen: dict[tuple[str, int, int, int], DeviceInfo] = {}
    for d in doms:
        # as a back end: /local/domain/d/backend/T/F/N
        try:
            types = await store.directory(f"/local/domain/{d}/backend")
        except (FileNotFoundError, PermissionError):
            types = []
        for t in types:
            for fe in await _ints(store, f"/local/domain/{d}/backend/{t}"):
                for n in await _ints(store, f"/local/domain/{d}/backend/{t}/{fe}"):
                    bdir = backend_dir(d, t, fe, n)
                    raw = await read_opt(store, f"{bdir}/frontend")
                    fdir = raw.decode(errors="replace") if raw else frontend_dir(fe, t, n)
                    seen[(t, fe, d, n)] = await _info(store, t, fe, d, n, fdir, bdir)
        # as a front end: /local/domain/d/device/T/N
        try:
            types = await store.directory(f"/local/domain/{d}/device")
        except (FileNotFoundError, PermissionError):
            types = []
        for t in types:
            for n in await _ints(store, f"/local/domain/{d}/device/{t}"):
                fdir = frontend_dir(d, t, n)
                try:
                    be = read_int(await read_opt(store, f"{fdir}/backend-id"), "backend-id", -1)
                except ProtocolError:
                    be = -1
                raw = await read_opt(store, f"{fdir}/backend")
                bdir = raw.decode(errors="replace") if raw else ""
                if (t, d, be, n) not in seen:
                    seen[(t, d, be, n)] = await _info(store, t, d, be, n, fdir, bdir)
    return [seen[k] for k in sorted(seen)]


__all__ = ["DeviceInfo", "add_device", "list_devices", "remove_device"]
