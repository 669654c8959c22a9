"""The ``adam-jax`` command line (also ``python -m adam_jax``).

* ``adam-jax --version``: the installed version.
* ``adam-jax demo [ARGS]``: run ``examples/demo.py`` of the source checkout.
* ``adam-jax bench [ARGS]``: run ``benchmarks/bench_update.py`` of the source checkout
  (``--out FILE`` writes the whole run as JSON).

The demo and the benchmarks are scripts in the repository, not part of the installed
package: they need a checkout (an editable install, ``pip install -e .``, has one).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import adam_jax

SCRIPTS = {"demo": "examples/demo.py", "bench": "benchmarks/bench_update.py"}
CHECKOUT = Path(__file__).resolve().parent.parent
# The optimizer families, as the help names them: one entry each.
FAMILIES = (
    "Adam",
    "AMSGrad",
    "Adamax",
    "NAdam",
    "RAdam",
    "ADOPT",
    "AdEMAMix",
    "StableAdamW",
    "Schedule-Free AdamW",
)
DESCRIPTION = (
    f"{', '.join(FAMILIES[:-1])} and {FAMILIES[-1]} for JAX, exact against PyTorch, optax "
    "and Keras, with compiled early stopping."
)


def _run_script(command: str, args: list[str]) -> int:
    script = CHECKOUT / SCRIPTS[command]
    if not script.is_file():
        print(
            f"adam-jax {command}: needs a source checkout of adam_jax; {SCRIPTS[command]} "
            f"is not beside this installation ({CHECKOUT}). Clone the repository and run "
            f"`python {SCRIPTS[command]}` there.",
            file=sys.stderr,
        )
        return 2
    return subprocess.run([sys.executable, str(script), *args], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adam-jax", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"adam_jax {adam_jax.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    helps = {
        "demo": "run the demo's checks (examples/demo.py of the checkout)",
        "bench": (
            "time one step of each family against optax and torch, goals met or missed "
            "(benchmarks/bench_update.py; `adam-jax bench --help` for its options)"
        ),
    }
    for command in SCRIPTS:
        sub.add_parser(command, help=helps[command], add_help=False)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return _run_script(args.command, rest)


if __name__ == "__main__":
    sys.exit(main())
