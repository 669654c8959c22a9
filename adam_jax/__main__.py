"""``adam-jax`` command line: ``adam-jax demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adam-jax", description="Adam, AMSGrad and Adamax for JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="reproduce the seed documents and check every result against its reference"
    )
    demo.add_argument("--every", type=int, default=100, help="print the loss every N steps")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from adam_jax import _demo

        return _demo.run(every=args.every)
    return 2


if __name__ == "__main__":
    sys.exit(main())
