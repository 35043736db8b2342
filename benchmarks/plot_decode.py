"""Plot the decode benchmark: step time against batch, one panel per model, one line per variant.

    python benchmarks/plot_decode.py [FILE ...] [--png PATH]
FILEs default to benchmarks/results/decode-cuda.json (several are merged, say one per model);
the PNG defaults to the first file's name with .png. The dashed line is the weight-read bound.
Needs matplotlib (`pip install -e '.[bench]'`); the GPU machine need not have it: plot here
from the JSON it wrote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.decode_report import VARIANTS, load_results  # noqa: E402


def series(result: dict[str, Any], model: str) -> dict[str, tuple[list[int], list[float]]]:
    """Variant -> (batches, step ms) over the model's ok rows, batches ascending."""
    found: dict[str, tuple[list[int], list[float]]] = {}
    rows = sorted((row for row in result["rows"]
                   if row["model"] == model and row.get("status") == "ok"),
                  key=lambda row: row["batch"])
    for row in rows:
        batches, times = found.setdefault(row["variant"], ([], []))
        batches.append(row["batch"])
        times.append(row["step_ms"])
    return {variant: found[variant] for variant in VARIANTS if variant in found}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({row["model"] for row in result["rows"]})
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for axis, model in zip(axes[0], models):
        for variant, (batches, times) in series(result, model).items():
            style = "-" if variant.startswith(("fxkiln", "ours")) else "--"
            axis.plot(batches, times, style, marker="o", label=variant)
        bounds = sorted({(row["batch"], row["weight_read_bound_ms"]) for row in result["rows"]
                         if row["model"] == model and "weight_read_bound_ms" in row})
        if bounds:
            axis.plot(*zip(*bounds), ":", color="black", label="weight-read bound")
        failed = sorted({f"{row['variant']}@{row['batch']}" for row in result["rows"]
                         if row["model"] == model and row.get("status") != "ok"})
        axis.set_xscale("log", base=2)
        axis.set(yscale="log", xlabel="batch (sequences, one token each)",
                 ylabel="decode step, ms (median)", title=model)
        batches = sorted({row["batch"] for row in result["rows"] if row["model"] == model})
        axis.set_xticks(batches, [str(batch) for batch in batches])
        axis.minorticks_off()
        if failed:
            axis.text(0.01, 0.01, "failed: " + ", ".join(failed), transform=axis.transAxes,
                      fontsize=7, color="red", wrap=True)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="best", framealpha=0.8)
    versions = result.get("versions", {})
    figure.suptitle(f"{result.get('device', '?')}, {result.get('dtype', '?')}, context "
                    f"{result.get('context_tokens', '?')}; torch {versions.get('torch', '?')}, "
                    f"transformers {versions.get('transformers', '?')}", fontsize=9)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*",
                        default=[str(ROOT / "benchmarks" / "results" / "decode-cuda.json")])
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    result = load_results(Path(name).read_text() for name in args.files)
    png = Path(args.png) if args.png else Path(args.files[0]).with_suffix(".png")
    plot(result, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
