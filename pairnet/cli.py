"""The ``pairnet`` command: argument parsing at the edge, the work in the library.

Every :class:`PairnetError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pairnet.errors import PairnetError

log = logging.getLogger("pairnet")


def whole(text: str) -> int:
    """An integer that also accepts MLflow's float spelling ("6.0")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


# ---------------------------------------------------------------- data
def _cmd_data_check(args) -> int:
    from pairnet.data.pairs import load_pairs

    pairs = load_pairs(args.file, labels=args.labels)
    s = pairs.summary()
    balance = f"label 1 share {s['label_1_share']:.3f}" if "label_1_share" in s else "no labels"
    ids = f"ids {s['id_pattern']}" if "id_pattern" in s else "no ids"
    print(f"{args.file}: OK — N={s['n']}, {balance}, {ids}")
    return 0


def _cmd_data_make(args) -> int:
    from pairnet.data.generate import GenConfig, make_dataset

    cfg = GenConfig(size=args.size, severity=args.severity, seed=args.seed, neighbour_share=args.neighbour_share)
    meta = make_dataset(args.out, cfg)
    for split, stats in meta["stats"].items():
        print(f"{split:8s} {meta['counts'][split]:6d} pairs  mean {stats['mean_pixel']:5.1f}  zeros {stats['zero_share']:.1%}")
    print(f"wrote {args.out}")
    return 0


def _cmd_data_preview(args) -> int:
    from pairnet.data.generate import FILES
    from pairnet.data.pairs import load_pairs
    from pairnet.data.preview import preview_grid

    src = Path(args.path)
    if src.is_dir():
        src = src / FILES[args.split]
    out = preview_grid(load_pairs(src), args.out, n=args.n)
    print(f"wrote {out}")
    return 0


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="check, make and preview pair files").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("check", help="validate a pair file and print a summary")
    p.add_argument("file")
    p.add_argument("--labels", help="labels CSV (id,label) to join by id")
    p.set_defaults(func=_cmd_data_check)

    p = data.add_parser("make", help="write the embedded default dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=["tiny", "quick", "full"], default="full")
    p.add_argument("--severity", type=whole, default=6)
    p.add_argument("--seed", type=whole, default=42)
    p.add_argument("--neighbour-share", type=float, default=0.8)
    p.set_defaults(func=_cmd_data_make)

    p = data.add_parser("preview", help="draw a labelled grid of pairs as PNG")
    p.add_argument("path", help="a pair file or a data folder")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--split", choices=["train", "val", "public", "private"], default="train")
    p.add_argument("-n", type=int, default=24)
    p.set_defaults(func=_cmd_data_preview)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairnet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except PairnetError as err:
        print(f"pairnet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pairnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
