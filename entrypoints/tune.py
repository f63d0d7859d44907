"""MLproject entry point `tune`: parse → call pairnet → exit."""

import sys

from pairnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
