"""Block devices: the blkif protocol, blkback, blkfront and an NBD export.

* :mod:`aioxen.blk.blkif` — the pure wire codec and request validation.
* :mod:`aioxen.blk.source` — block sources a backend serves (file, memory).
* :mod:`aioxen.blk.split` — how the frontend cuts I/O into ring requests (pure).
* :mod:`aioxen.blk.back` / :mod:`aioxen.blk.front` — blkback and blkfront.
* :mod:`aioxen.blk.nbd` — an NBD server exporting any block device.
"""

from __future__ import annotations
