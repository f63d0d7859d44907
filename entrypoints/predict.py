"""MLproject entry point `predict`: parse → call pairnet → exit (``--force true|false``)."""

import sys

from pairnet.cli import main, param_flags

if __name__ == "__main__":
    sys.exit(main(["predict", *param_flags(sys.argv[1:], "--force", "--tta")]))
