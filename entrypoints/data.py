"""MLproject entry point `data`: make the embedded default dataset (``--force true|false``)."""

import sys

from pairnet.cli import main, param_flags

if __name__ == "__main__":
    sys.exit(main(["data", "make", *param_flags(sys.argv[1:], "--force")]))
