"""The client side of the handshake: find the advertisement, attach, retry if stale.

Theory of operation
-------------------
[`connect_client`][] holds a (shared) watch on ``<path>/event-channel``, waits for its
turn among the waiters of this process (see [`advertise`][aioxen.vchan.advertise]) and loops: read
the advertisement; if there is one, [`attach_client`][aioxen.vchan.endpoint.attach_client]
(the turn passes to the next waiter as soon as the port is bound: a server that sees the
bind re-advertises at once, so the next client overlaps this one's mapping); if it
was stale (endpoint already taken by a concurrent client, or gone), wait for the next
change of the key -- the server re-advertises after every connect -- or, as a safety net,
[`RETRY_INTERVAL`][] seconds.  The whole wait is bounded by ``timeout``; cancellation
at any point releases whatever the current attempt acquired.
"""

from __future__ import annotations

import asyncio

from aioxen.platforms.base import Platform, check_domid
from aioxen.vchan import advertise
from aioxen.vchan.endpoint import (
    Connection,
    StaleAdvertisement,
    attach_client,
    check_port,
    check_size,
    vchan_path,
)

DEFAULT_CONNECT_TIMEOUT = 30.0
"""Seconds a client waits for a server to advertise (``timeout=`` overrides, ``None`` =
wait until cancelled)."""

RETRY_INTERVAL = 0.5


async def connect_client(
    platform: Platform,
    domid: int,
    port: str,
    *,
    read_size: int | None = None,
    write_size: int | None = None,
    timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
) -> Connection:
    """Connect to the vchan ``port`` served by domain ``domid``; see the module docstring.

    ``TimeoutError`` names the XenStore path (and the last stale endpoint seen).
    """
    check_domid(domid)
    check_port(port)
    if read_size is not None:
        check_size(read_size, "read_size")
    if write_size is not None:
        check_size(write_size, "write_size")
    path = vchan_path(domid, platform.domid, port)
    last: BaseException | None = None
    deadline = asyncio.timeout(timeout)
    try:
        key = f"{path}/{advertise.EVENT_CHANNEL}"
        async with deadline, advertise.watch_key(platform, key) as sw:
            turn = sw.turn
            held = False

            def release_turn() -> None:
                nonlocal held
                if held:
                    held = False
                    turn.release()

            try:
                patient = True
                while True:
                    if not held:
                        await turn.acquire()
                        held = True
                    seen = sw.generation
                    if seen == sw.consumed and patient:
                        # Another waiter here took this advertisement: wait for the next
                        # one (or, as a safety net, RETRY_INTERVAL) instead of trying it.
                        patient = await sw.wait_change(seen, RETRY_INTERVAL)
                        continue
                    ad = await sw.read(seen, lambda: advertise.read(platform, path))
                    if ad is not None and ad == sw.consumed_ad and patient:
                        # A change, but still the advertisement taken here: wait again.
                        patient = await sw.wait_change(seen, RETRY_INTERVAL)
                        continue
                    patient = True
                    if ad is not None:

                        def bound(seen: int = seen, ad: tuple[int, int] = ad) -> None:
                            # The port is ours (or the endpoint dead): the next waiter
                            # may look for the next advertisement while we map and go
                            # live -- the server re-advertises as soon as it sees a bind.
                            sw.consumed, sw.consumed_ad = seen, ad
                            release_turn()

                        try:
                            return await attach_client(
                                platform,
                                domid,
                                port,
                                ad[0],
                                ad[1],
                                read_size=read_size,
                                write_size=write_size,
                                on_bound=bound,
                            )
                        except StaleAdvertisement as exc:
                            last = exc
                        if not held:
                            continue  # bound, then stale: wait for the next generation
                    await sw.wait_change(seen, RETRY_INTERVAL)
            finally:
                release_turn()
    except TimeoutError:
        if not deadline.expired():
            raise
        detail = f"; last attempt: {last}" if last is not None else ""
        raise TimeoutError(
            f"no vchan server for domid {domid} port {port!r} at {path} within {timeout} s" + detail
        ) from None


__all__ = ["DEFAULT_CONNECT_TIMEOUT", "connect_client"]
