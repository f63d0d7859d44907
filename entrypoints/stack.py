"""MLproject entry point `stack`: parse → call pairnet → exit."""

import sys

from pairnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["stack", *sys.argv[1:]]))
