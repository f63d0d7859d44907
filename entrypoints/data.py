"""MLproject entry point `data`: make the embedded default dataset."""

import sys

from pairnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "make", *sys.argv[1:]]))
