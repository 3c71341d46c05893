"""Former home of the PV console, now [`aioxen.console`][] (one package per device, like
[`aioxen.net`][] and [`aioxen.blk`][]).  ``aioxen.devices.console`` still imports, for
code written against the old path; new devices get their own package."""
