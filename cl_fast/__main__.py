"""Command line: `python -m cl_fast bench [options]` prints the loss benchmark table;
`python -m cl_fast train {simclr,moco,byol,swav} [options]` trains a self-supervised encoder
with the fused losses; `python -m cl_fast backends` lists the backends available here."""
import argparse
import importlib.util
import pathlib
import sys

# The benchmark harness is a script of the repository (benchmarks/bench.py), not part of the
# installed library; `python -m cl_fast bench` runs it from the checkout this package came from.
BENCH_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def _bench(argv) -> int:
    if not BENCH_SCRIPT.is_file():
        print(f"python -m cl_fast bench: the benchmark harness ({BENCH_SCRIPT}) is not here; it ships with "
              "the source checkout, not the installed package", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("cl_fast_bench", BENCH_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the script runs
    spec.loader.exec_module(bench)
    return bench.main(argv)


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
    return _bench(rest)


if __name__ == "__main__":
    sys.exit(main())
