"""MLproject entry point `predict`: parse → call pairnet → exit."""

import sys

from pairnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
