"""Command line: `python -m cl_fast bench [options]` prints the loss benchmark table;
`python -m cl_fast train {simclr,moco,byol,swav} [options]` trains a self-supervised encoder
with the fused losses; `python -m cl_fast backends` lists the backends available here."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cl_fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="forward+backward time and peak extra memory per backend", add_help=False)
    sub.add_parser("train", help="SimCLR / MoCo v2 / BYOL / SwAV trainers on the fused losses", add_help=False)
    sub.add_parser("backends", help="list the backends available here")
    args, rest = parser.parse_known_args(argv)
    if args.command == "backends":
        from . import backends

        print(" ".join(backends()))
        return 0
    if args.command == "train":
        from .train import cli

        return cli.main(rest)
    from . import bench

    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
