"""The ``adam-jax`` command line (also ``python -m adam_jax``).

* ``adam-jax demo``: reproduce the seed documents and check every result.
* ``adam-jax bench ...``: the benchmarks; arguments are passed on to ``adam_jax._bench``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_BENCH_MISSING = (
    "adam-jax bench: the benchmark module adam_jax._bench is not available in this "
    "installation, so there is nothing to run"
)


def _parser() -> argparse.ArgumentParser:
    from adam_jax import _demo

    parser = argparse.ArgumentParser(
        prog="adam-jax",
        description="Adam, AMSGrad and Adamax for JAX: demo and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="reproduce the seed documents and check every result against its reference",
        description=(
            "Reproduce each seed document with adam_jax and check it against an independent "
            "reference: the worked example by hand (seed 002), the NumPy Adam loop (seed 001), "
            "seed 000's MLP with AMSGrad against torch.optim.Adam(amsgrad=True) (or, without "
            "torch, against its expected decreasing loss), seed 003's Adamax function, and an "
            "early-stopping run against the patience rule applied to a full run. Prints a "
            "table, runs a vmapped sweep, writes a PNG of the convergence curves (needs "
            "matplotlib) and exits with status 1 if any reproduction does not match. Runs in "
            "float64 (jax_enable_x64)."
        ),
    )
    demo.add_argument(
        "--out",
        default=_demo.DEFAULT_OUT,
        metavar="PATH",
        help=f"where to write the figure (default: ./{_demo.DEFAULT_OUT})",
    )
    demo.add_argument(
        "--no-torch",
        action="store_true",
        help="do not compare seed 000 with PyTorch even if it is installed; check the "
        "expected decreasing loss instead",
    )
    sub.add_parser(
        "bench",
        help="run the benchmarks; all further arguments go to them (see adam-jax bench --help)",
        add_help=False,
    )
    return parser


def _bench(args: list[str]) -> int:
    try:
        bench = importlib.import_module("adam_jax._bench")
    except ModuleNotFoundError as e:
        if e.name != "adam_jax._bench":
            raise
        if any(a in ("-h", "--help") for a in args):
            print("usage: adam-jax bench [ARGS ...]\n")
            print(_BENCH_MISSING + ".")
            return 0
        print(_BENCH_MISSING + ".", file=sys.stderr)
        return 2
    return int(bench.main(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # bench's arguments belong to the benchmark's own parser, --help included.
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from adam_jax import _demo

        return _demo.run(out=args.out, use_torch=not args.no_torch)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
