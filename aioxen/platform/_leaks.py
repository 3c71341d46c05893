"""Leak checks for the platform classes: what a platform object still has open.

Theory of operation
-------------------
Each platform's event-channel and grant objects keep a list of what was opened through them
and not closed yet (``live()``).  :class:`LeakChecks` turns those into ``leaks()`` — one
``repr`` per channel (in port order), then the shares and mappings (sorted) — and
``assert_cleaned_up()``, which raises ``AssertionError`` listing them.  Tests call these after
closing everything, so a forgotten port, share or mapping fails the test that leaked it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol


class _Tracked(Protocol):
    def live(self) -> Sequence[object]: ...


def assert_no_leaks(what: str, leaks: list[str]) -> None:
    """Raise ``AssertionError`` naming ``what`` and listing ``leaks``, if there are any."""
    if leaks:
        raise AssertionError(f"{what} not cleaned up:\n  " + "\n  ".join(leaks))


class LeakChecks:
    """Mixin for :class:`~aioxen.platform.base.Platform` subclasses whose ``events`` and
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


__all__ = ["LeakChecks", "assert_no_leaks"]
