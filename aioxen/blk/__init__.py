"""Block devices: the blkif protocol, blkback, blkfront and an NBD export.

* `aioxen.blk.blkif` — the pure wire codec, fast ring codecs and request validation.
* [`aioxen.blk.source`][] — block sources a backend serves (image file, memory).
* [`aioxen.blk.device`][] — the async ``BlockDevice`` interface (and ``SourceDevice``).
* `aioxen.blk.split` / `aioxen.blk.pool` — how blkfront cuts and merges I/O,
  and allocates its granted pages (pure).
* [`aioxen.blk.back`][] / [`aioxen.blk.front`][] — the blkback and blkfront data paths.
* [`aioxen.blk.vbd`][] — their xenbus drivers (``Blkback``, ``open_blkfront``).
* `aioxen.blk.nbdwire` / [`aioxen.blk.nbd`][] — an NBD server for any block device.
* `aioxen.blk.cli` — ``aioxen blkback`` and ``aioxen blkfront``.
"""

from __future__ import annotations
