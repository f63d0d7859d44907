"""MLproject entry point `data`: make the embedded default dataset.

MLproject passes ``--force true|false``; the CLI's ``--force`` is a plain flag.
"""

import sys

from pairnet.cli import main


def _argv(args: list[str]) -> list[str]:
    out, it = [], iter(args)
    for arg in it:
        if arg == "--force":
            if next(it, "false").strip().lower() in ("1", "true", "yes"):
                out.append("--force")
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main(["data", "make", *_argv(sys.argv[1:])]))
