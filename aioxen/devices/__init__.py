"""Former home of the PV console, now :mod:`aioxen.console` (one package per device, like
:mod:`aioxen.net` and :mod:`aioxen.blk`).  ``aioxen.devices.console`` still imports, for
code written against the old path; new devices get their own package."""
