"""Draw docs/performance.png from the JSON results in bench/results/.

python bench/chart.py            # reads bench/results/*.json, writes docs/performance.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Benchmark 5's runs on one kind of GPU, drawn together.
# The latest GPU run, then the step-distilled schedule from the earlier one: (file, the configurations
# taken from it, or all; the names its configurations have today, where they changed since).
# When those files were written, `fast` was PyramidAttentionBroadcast (`fast-pab` today) and
# TaylorSeer lite, the fast tier since, was measured as `fast-taylorseer`.
RENAMED_SINCE = {"fast": "fast-pab", "fast-taylorseer": "fast"}
GPU_RESULTS = (
    ("gpu-pipeline-h100-ltx-taylorseer.json", None, RENAMED_SINCE),
    ("gpu-pipeline-h100-wan-taylorseer.json", None, RENAMED_SINCE),
    ("gpu-pipeline-h100-wan-large.json", None, RENAMED_SINCE),
    # Wan's eager at 256x256x17 with 5 repeats and the fast tier at the two larger sizes, 10 steps.
    ("gpu-pipeline-h100-wan-fast-large.json", None, {}),
    # Wan at 768x768x129, 20 steps: eager (its bare time is the fast row's reference), then the fast tier.
    ("gpu-pipeline-h100-wan-eager-768x768-20.json", None, {}),
    ("gpu-pipeline-h100-wan-fast-768x768-20.json", None, {}),
    ("gpu-pipeline-h100-ltx.json", {"fast-schedule"}, {}),
    ("gpu-pipeline-h100-wan-256.json", {"fast-schedule"}, {}),
    ("gpu-pipeline-h100-wan-512.json", {"fast-schedule"}, {}),
)
CONFIG_COLOURS = {
    "eager": "tab:grey",
    "compile": "tab:blue",
    "fast-pab": "tab:purple",
    "fast": "tab:red",
    "fast-schedule": "tab:green",
}
CONFIG_LABELS = {"fast": "fast (TaylorSeer lite)"}


def label(row: dict) -> str:
    """A GPU row's place on the chart: model and size, and the run's steps where they are not 20."""
    steps = "" if row["run_steps"] == 20 else f" ({row['run_steps']} steps)"
    return f"{row['family']} {row['width']}x{row['height']}x{row['num_frames']}{steps}"


def load(results: Path, name: str) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.png")
    args = parser.parse_args()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    fig.suptitle("videogen benchmarks (bench/; figures in docs/PERFORMANCE.md)")

    gateway = load(args.results, "gateway-throughput.json")
    ax = axes[0][0]
    if gateway:
        # Rows of a key with a quota and of one without (results before that have only the former).
        labels = [
            f"{r['clients']}\nno quota" if r.get("key") == "unlimited" else str(r["clients"]) for r in gateway["rows"]
        ]
        colors = ["tab:cyan" if r.get("key") == "unlimited" else "tab:blue" for r in gateway["rows"]]
        ax.bar(labels, [r["per_s"] for r in gateway["rows"]], color=colors)
        ax.tick_params(axis="x", labelsize=8)
        ax2 = ax.twinx()
        ax2.plot(labels, [r["p99_ms"] for r in gateway["rows"]], "o", color="tab:red")
        ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax.set(title="1. Gateway submissions/s (bars) and p99", xlabel="concurrent clients (key)", ylabel="submissions/s")

    events = load(args.results, "event-latency.json")
    ax = axes[0][1]
    if events:
        labels = [f"{r['rate_per_s']:.0f}/s" for r in events["rows"]]
        ax.bar([x + " p50" for x in labels], [r["p50_ms"] for r in events["rows"]], color="tab:green")
        ax.bar([x + " p99" for x in labels], [r["p99_ms"] for r in events["rows"]], color="tab:olive")
        ax.axhline(20, ls="--", color="grey", label="goal p99 20 ms")
        ax.legend()
    ax.set(title="2. Event latency, worker publish → WebSocket", ylabel="ms")

    overhead = load(args.results, "service-overhead.json")
    ax = axes[0][2]
    if overhead:
        parts = ["submit", "queued", "encode", "upload", "overhead", "pipeline"]
        ax.bar(
            parts, [overhead["summary"][p]["p50_ms"] for p in parts], color=["tab:blue"] * 4 + ["tab:red", "tab:grey"]
        )
        ax.axhline(100, ls="--", color="grey", label="goal: overhead < 100 ms")
        ax.tick_params(axis="x", labelrotation=30)
        ax.legend()
    ax.set(title="3. Per-job medians, tiny model on CPU", ylabel="ms")

    scale = load(args.results, "scale-out.json")
    ax = axes[1][0]
    if scale:
        workers = [r["workers"] for r in scale["rows"]]
        ax.plot(workers, [r["speedup"] for r in scale["rows"]], "o-", label="measured")
        ax.plot(workers, workers, "--", color="grey", label="linear")
        ax.legend()
        ax.set_xticks(workers)
    ax.set(
        title=f"4. Scale-out ({scale['cpu_cores'] if scale else '?'} CPU cores)",
        xlabel="worker processes",
        ylabel="jobs/s relative to one worker",
    )

    gpu_rows = [
        row | {"config": renamed.get(row["config"], row["config"]), "run_steps": run["steps"]}
        for name, configs, renamed in GPU_RESULTS
        for run in [load(args.results, name) or {"rows": [], "steps": 0}]
        for row in run["rows"]
        if configs is None or row["config"] in configs
    ]
    gpu_rows = [row for row in gpu_rows if row["config"] in CONFIG_COLOURS]
    # A run without an eager row at a size takes the bare eager time of another run on the same kind
    # of GPU at that size and step count.
    eager_bare = {
        (r["family"], r["width"], r["height"], r["num_frames"], r["steps"]): r["bare_s"]
        for r in gpu_rows
        if r["config"] == "eager"
    }
    for row in gpu_rows:
        key = (row["family"], row["width"], row["height"], row["num_frames"], row["steps"])
        if row.get("speedup_vs_eager_bare") is None and row["config"] != "fast-schedule" and key in eager_bare:
            row["speedup_vs_eager_bare"] = round(eager_bare[key] / row["served_s"], 3)
    device = next((d["device"] for n, _, _ in GPU_RESULTS if (d := load(args.results, n))), "GPU")
    device = device.removeprefix("NVIDIA ").split()[0]  # "NVIDIA H100 80GB HBM3" -> "H100"
    sizes = list(dict.fromkeys(label(r) for r in gpu_rows))
    panels = (
        (axes[1][1], "served_over_bare", ("eager", "compile"), "5. Served / bare, standard tier", "goal ≤ 1.05", 1.05),
        (axes[1][2], "speedup_vs_eager_bare", tuple(CONFIG_COLOURS), "5. Speed-up over bare eager", "goal ≥ 2x", 2.0),
    )
    for ax, field, configs, title, goal_label, goal in panels:
        if not gpu_rows:
            ax.axis("off")
            continue
        height = 0.8 / len(configs)
        for i, config in enumerate(configs):
            values = {
                label(r): r.get(field) for r in gpu_rows if r.get("config") == config and r.get(field) is not None
            }
            ys = [k + i * height for k, size in enumerate(sizes) if values.get(size)]
            ax.barh(
                ys,
                [values[s] for s in sizes if values.get(s)],
                height,
                color=CONFIG_COLOURS[config],
                label=CONFIG_LABELS.get(config, config),
            )
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(sizes))], sizes)
        ax.invert_yaxis()
        ax.axvline(goal, ls="--", color="grey", label=goal_label)
        ax.set_xlim(0, max(r.get(field) or 0 for r in gpu_rows) * 1.35)  # room for the legend on the right
        ax.legend(fontsize="small", loc="lower right", framealpha=0.9)
        ax.set(title=f"{title} ({device})", xlabel="ratio" if goal < 2 else "x")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
