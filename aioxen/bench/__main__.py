import sys

from aioxen.bench.cli import main

sys.exit(main())
