"""MLproject entry point `stage3`: parse → call pairnet → exit."""

import sys

from pairnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage3", *sys.argv[1:]]))
