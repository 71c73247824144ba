"""Command line: `python -m cl_fast bench [options]` prints the loss benchmark table."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cl_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="forward+backward time and peak extra memory per backend", add_help=False)
    sub.add_parser("backends", help="list the backends available here")
    args, rest = parser.parse_known_args(argv)
    if args.command == "backends":
        from . import backends

        print(" ".join(backends()))
        return 0
    from . import bench

    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
