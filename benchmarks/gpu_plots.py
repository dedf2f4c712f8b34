"""Plots of the recorded GPU results (no GPU needed): reads ``results/gpu/*.json``.

Usage::

    python benchmarks/gpu_plots.py [--dir benchmarks/results/gpu]

Writes ``gpu-kernels.png`` (steer and SAS op: fraction of the measured copy bandwidth and
microseconds per call inside a CUDA graph, by token count, per hidden size) and
``gpu-graph-stack.png`` (steered / plain step time per scenario, both graph modes, both model
shapes) into the same folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_kernels(res: dict, path: Path) -> None:
    """Bandwidth fraction and graph time per call against the token count."""
    fig, (ax_bw, ax_us) = plt.subplots(1, 2, figsize=(12, 4.5))
    for op, style in (("steer", "-"), ("sas", "--")):
        for d in sorted({r["hidden"] for r in res["rows"]}):
            rows = sorted((r for r in res["rows"] if r["op"] == op and r["hidden"] == d), key=lambda r: r["tokens"])
            t = [r["tokens"] for r in rows]
            ax_bw.plot(t, [r["fraction_of_copy"] for r in rows], style, marker="o", ms=3, label=f"{op}, d={d}")
            ax_us.plot(t, [r["us_graph"] for r in rows], style, marker="o", ms=3, label=f"{op}, d={d}")
    ax_bw.axhline(0.7, color="grey", lw=0.8, ls=":")
    ax_bw.set(xscale="log", xlabel="tokens per call", ylabel="fraction of copy bandwidth",
              title=f"{res['device']}: achieved / copy ({res['copy_gbs']:.0f} GB/s)")
    ax_us.set(xscale="log", yscale="log", xlabel="tokens per call", ylabel="us per call (in a CUDA graph)",
              title="time per call")
    for ax in (ax_bw, ax_us):
        ax.grid(alpha=0.3)
    ax_us.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_stack(res: dict, path: Path) -> None:
    """Steered / plain step-time ratios per scenario."""
    models = [m for m in res["models"] if "rows" in m]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in m["rows"] if "scenario" in r and r["scenario"] != "plain"]
        scen = list(dict.fromkeys(r["scenario"] for r in rows))
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            ratio = {r["scenario"]: r["ratio_to_plain"] for r in rows if r["mode"] == mode}
            ax.barh([j + i * width for j in range(len(scen))], [ratio.get(s, 0) for s in scen], height=width,
                    label=mode)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks([j + width * (len(modes) - 1) / 2 for j in range(len(scen))], scen, fontsize=7)
        ax.set(xlim=(0.9, max(1.15, ax.get_xlim()[1])), xlabel="step time, steered / plain",
               title=f"{m['model']}, batch {m['batch']}, {m['dtype']}")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    args = p.parse_args(argv)
    plot_kernels(json.loads((args.dir / "gpu_kernels.json").read_text()), args.dir / "gpu-kernels.png")
    plot_stack(json.loads((args.dir / "gpu_graph_stack.json").read_text()), args.dir / "gpu-graph-stack.png")
    print(f"wrote {args.dir / 'gpu-kernels.png'} and {args.dir / 'gpu-graph-stack.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
