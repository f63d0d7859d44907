"""MLproject entry point `stage1`: parse → call pairnet → exit."""

import sys

from pairnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage1", *sys.argv[1:]]))
