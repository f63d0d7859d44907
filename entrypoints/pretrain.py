"""MLproject entry point `pretrain`: parse → call pairnet → exit."""

import sys

from pairnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
