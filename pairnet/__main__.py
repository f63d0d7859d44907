"""``python -m pairnet``: the same as the ``pairnet`` command."""

import sys

from pairnet.cli import main

sys.exit(main())
