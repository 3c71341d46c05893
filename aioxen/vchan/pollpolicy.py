"""The busy-poll policy moved to [`aioxen.pollpolicy`][] (vchan transports and the io/ring.h
ring adapters share it); this name stays for code that imported it from here."""

from aioxen.pollpolicy import *  # noqa: F403
from aioxen.pollpolicy import __all__ as __all__
