"""MLproject entry point `pipeline`: parse → call pairnet → exit."""

import sys

from pairnet.cli import main, param_flags

if __name__ == "__main__":
    sys.exit(main(["pipeline", *param_flags(sys.argv[1:], "--plan", "--tta")]))
