"""``python -m vsteer.cli ...``: the same as the ``vsteer`` command."""

import sys

from vsteer.cli import main

sys.exit(main())
