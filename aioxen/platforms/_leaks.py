"""What a platform object still has open: leak checks, and closing it all.

Theory of operation
-------------------
Each platform's event-channel and grant objects keep a list of what was opened through them
and not closed yet (``live()``).  [`LeakChecks`][] turns those into ``leaks()`` — one
``repr`` per channel (in port order), then the shares and mappings (sorted) — and
``assert_cleaned_up()``, which raises ``AssertionError`` listing them.  Tests call these after
closing everything, so a forgotten port, share or mapping fails the test that leaked it.

[`ClosesAllOpened`][] adds the ``close()`` of the platforms that do their own unmap
notifications (``inheap``, ``unix``): mappings and shares first, then channels, so the
notifications still reach open channels; then the XenStore client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol


class _Tracked(Protocol):
    def live(self) -> Sequence[object]: ...


class _Closable(_Tracked, Protocol):
    def close_all(self) -> None: ...


def assert_no_leaks(what: str, leaks: list[str]) -> None:
    """Raise ``AssertionError`` naming ``what`` and listing ``leaks``, if there are any."""
    if leaks:
        raise AssertionError(f"{what} not cleaned up:\n  " + "\n  ".join(leaks))


class LeakChecks:
    """Mixin for [`Platform`][aioxen.platforms.base.Platform] subclasses whose ``events`` and
    ``grants`` list what they have open (``live()``)."""

    if TYPE_CHECKING:

        @property
        def events(self) -> _Tracked: ...

        @property
        def grants(self) -> _Tracked: ...

    def leaks(self) -> list[str]:
        """What this platform object opened and has not closed yet."""
        out = [repr(ch) for ch in self.events.live()]
        out += sorted(repr(o) for o in self.grants.live())
        return out

    def assert_cleaned_up(self) -> None:
        """Raise ``AssertionError`` listing channels/shares/mappings this object leaked."""
        assert_no_leaks(repr(self), self.leaks())


class ClosesAllOpened(LeakChecks):
    """Mixin for [`Platform`][aioxen.platforms.base.Platform] subclasses whose ``events`` and
    ``grants`` can close everything opened through them (``close_all()``)."""

    if TYPE_CHECKING:

        @property
        def events(self) -> _Closable: ...

        @property
        def grants(self) -> _Closable: ...

        async def _close_store(self) -> None: ...

        async def end_users(self) -> None: ...

    async def close(self) -> None:
        """End the transports running over this object (``Platform.end_users``: flush a
        ``close()`` in progress, bounded, else abort), then close every mapping, share and
        channel opened through it (in that order, so unmap notifications still reach their
        channels), then the XenStore connection.  Idempotent."""
        await self.end_users()
        self.grants.close_all()
        self.events.close_all()
        await self._close_store()


__all__ = ["ClosesAllOpened", "LeakChecks", "assert_no_leaks"]
