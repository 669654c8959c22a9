"""Markdown tables: the one formatter every benchmark prints with, and the step report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from harness.cases import ratio
from harness.hlo import REGION_ANALYSIS


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(header: list[str], rows: Iterable[list[str]], right: Iterable[int] = ()) -> str:
    """A Markdown table with padded columns; the columns numbered in ``right`` align right."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = set(right)

    def pad(c: str, i: int) -> str:
        return c.rjust(widths[i]) if i in right else c.ljust(widths[i])

    lines = ["| " + " | ".join(pad(c, i) for i, c in enumerate(r)) + " |" for r in cells]
    rule = ("-" * (w + 1) + (":" if i in right else "-") for i, w in enumerate(widths))
    lines.insert(1, "|" + "|".join(rule) + "|")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m["versions"]
    out = [
        f"adam_jax {v['adam_jax']} step benchmark ({'quick' if report['quick'] else 'full'}), "
        f"{report['timestamp']}",
        f"CPU: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); "
        f"jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, numpy {v['numpy']}, "
        f"torch {v['torch'] or 'not installed'}; backend {m['jax_backend']}"
        + (f"; XLA_FLAGS={m['xla_flags']}" if m["xla_flags"] else "")
        + (f"; OMP_WAIT_POLICY={m['omp_wait_policy']}" if m["omp_wait_policy"] else ""),
        f"Medians of {report['settings']['reps']} interleaved runs (ms); "
        "ratios are adam_jax's time over the other's (< 1 = adam_jax faster).",
    ]
    steps = [r for r in report["cases"] if r["case"] in ("one_leaf", "many_leaves", "bf16")]
    if steps:
        rows = []
        for r in steps:
            res = r["results"]
            med = {k: res[k]["median_ms"] for k in res}
            rows.append(
                [
                    r["case"] + ("" if r["case"] != "many_leaves" else f" ({r['leaves']})"),
                    r["optimizer"],
                    f"{r['n_params']:,}",
                    _fmt(r["bytes_per_param"], ".0f"),
                    _fmt(med.get("adam_jax")),
                    _fmt(med.get("optax")),
                    _fmt(med.get("torch_fused")),
                    _fmt(med.get("torch_foreach")),
                    _fmt(r["floor"]["median_ms"]),
                    _fmt(r["ratios"]["adam_jax/optax"]),
                    _fmt(r["ratios"]["adam_jax/torch_fused"]),
                    _fmt(r["ratios"]["adam_jax/floor"]),
                ]
            )
            ra = med.get("adam_jax_region_analysis")
            if ra is not None:
                rows.append(
                    [
                        r["case"] + " (region analysis)",
                        r["optimizer"],
                        "",
                        "",
                        _fmt(ra),
                        _fmt(med.get("optax")),
                        "-",
                        "-",
                        _fmt(r["floor"]["median_ms"]),
                        _fmt(ratio(ra, med.get("optax"))),
                        "-",
                        _fmt(ratio(ra, r["floor"]["median_ms"])),
                    ]
                )
        out += [
            "",
            "Step time",
            table(
                [
                    "case",
                    "optimizer",
                    "params",
                    "B/param",
                    "adam_jax",
                    "optax",
                    "torch fused",
                    "torch foreach",
                    "floor",
                    "vs optax",
                    "vs fused",
                    "vs floor",
                ],
                rows,
            ),
        ]
    many = [r for r in report["cases"] if r["case"] == "many_leaves"]
    if many:
        rows = []
        for r in many:
            c = r["compile"]
            rows.append(
                [
                    r["optimizer"],
                    str(r["leaves"]),
                    _fmt(c["adam_jax"]["trace_lower_s"]),
                    _fmt(c["adam_jax"]["compile_s"]),
                    _fmt(c["optax"]["trace_lower_s"]),
                    _fmt(c["optax"]["compile_s"]),
                    _fmt(c["ratio_compile_s"]),
                    _fmt(c["ratio_trace_plus_compile"]),
                ]
            )
        out += [
            "",
            "Compile time, many leaves (s)",
            table(
                [
                    "optimizer",
                    "leaves",
                    "adam_jax trace+lower",
                    "adam_jax compile",
                    "optax trace+lower",
                    "optax compile",
                    "compile ratio",
                    "total ratio",
                ],
                rows,
            ),
        ]
    vm = [r for r in report["cases"] if r["case"] == "vmap"]
    if vm:
        rows = []
        for r in vm:
            res = r["results"]
            rows.append(
                [
                    r["optimizer"],
                    f"{r['problems']} x {r['params_per_problem']}",
                    _fmt(res["adam_jax"]["median_ms"], ".3f"),
                    _fmt(res["optax"]["median_ms"], ".3f"),
                    _fmt(res["optax_python_loop"]["median_ms"], ".1f"),
                    _fmt(r["ratios"]["optax_python_loop/adam_jax"], ".0f"),
                ]
            )
        out += [
            "",
            "vmap over many small problems (ms)",
            table(
                [
                    "optimizer",
                    "problems x params",
                    "adam_jax jit(vmap)",
                    "optax jit(vmap)",
                    "optax Python loop",
                    "loop / adam_jax",
                ],
                rows,
            ),
            vm[0]["note"] + ".",
        ]
    rows = []
    for r in report["cases"]:
        for k in ("adam_jax", "optax", "adam_jax_region_analysis"):
            res = r["results"].get(k)
            if not res or "kernels" not in res:
                continue
            mem = r.get("memory", {}).get(k, {})
            rows.append(
                [
                    r["case"],
                    r["optimizer"],
                    k,
                    str(res["kernels"]),
                    str(res["copies"]),
                    _fmt(res["hlo_bytes_per_param"], ".1f"),
                    _fmt(r.get("bytes_per_param"), ".0f"),
                    _fmt(res["state_bytes"] / 2**20, ".1f"),
                    _fmt(mem.get("temp_bytes", 0) / 2**20, ".1f") if mem else "-",
                    _fmt(mem.get("peak/budget"), ".3f") if mem else "-",
                ]
            )
    out += [
        "",
        "Optimized HLO and memory (kernels over parameter-sized arrays; "
        "peak = XLA arguments + outputs - donated + temporaries; budget = params + grads + state)",
        table(
            [
                "case",
                "optimizer",
                "step",
                "kernels",
                "copies",
                "HLO B/param",
                "floor B/param",
                "state MiB",
                "temp MiB",
                "peak/budget",
            ],
            rows,
        ),
    ]
    if any("adam_jax_region_analysis" in r["results"] for r in report["cases"]):
        out += [
            "",
            "region analysis: the same step compiled with compiler_options="
            f"{REGION_ANALYSIS}, which lets XLA update donated bfloat16 moments in place.",
        ]
    return "\n".join(out)
