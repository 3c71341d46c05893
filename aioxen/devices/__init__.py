"""Split devices built on the xenbus framework (:mod:`aioxen.devices.console`, ...)."""
