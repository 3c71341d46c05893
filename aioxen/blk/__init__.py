"""Block devices: the blkif protocol, blkback, blkfront and an NBD export.

* :mod:`aioxen.blk.blkif` — the pure wire codec, fast ring codecs and request validation.
* :mod:`aioxen.blk.source` — block sources a backend serves (image file, memory).
* :mod:`aioxen.blk.device` — the async ``BlockDevice`` interface (and ``SourceDevice``).
* :mod:`aioxen.blk.split` / :mod:`aioxen.blk.pool` — how blkfront cuts and merges I/O,
  and allocates its granted pages (pure).
* :mod:`aioxen.blk.back` / :mod:`aioxen.blk.front` — the blkback and blkfront data paths.
* :mod:`aioxen.blk.vbd` — their xenbus drivers (``Blkback``, ``open_blkfront``).
* :mod:`aioxen.blk.nbdwire` / :mod:`aioxen.blk.nbd` — an NBD server for any block device.
* :mod:`aioxen.blk.cli` — ``aioxen blkback`` and ``aioxen blkfront``.
"""

from __future__ import annotations
