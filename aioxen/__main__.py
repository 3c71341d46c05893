import sys

from aioxen.cli import main

sys.exit(main())
