"""Run one ``aioxen`` subcommand on a chosen event loop: ``run_cli.py LOOP ARGS...``.

``aioxen.cli.main`` with ``$AIOXEN_LOOP`` set to LOOP: tests use this to run the same command
on asyncio's default loop as well.
"""

from __future__ import annotations

import os
import sys

from aioxen.cli import LOOP_ENV, main

if __name__ == "__main__":
    # the real entry point (error reporting, exit statuses 2/1/130/143) on the chosen loop
    os.environ[LOOP_ENV] = sys.argv[1]
    sys.exit(main(sys.argv[2:]))
