"""MLproject entry point `stage2`: parse → call pairnet → exit."""

import sys

from pairnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage2", *sys.argv[1:]]))
