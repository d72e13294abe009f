"""Learning curves of the five scripts' embedded defaults over several seeds, drawn into one PNG.

    pip install -r benchmarks/requirements.txt
    python benchmarks/curves.py                         # runs what is missing in runs/curves, then draws
    python benchmarks/curves.py --seeds 1 2 3 7 --no-run   # draws from finished runs only

Each run is `python X.py --seed N --save-dir RUNS/X-seedN` with nothing else changed, one at a time; a run whose
wall time was recorded (it is, once the run ended well) is read, not run again. The figure has held-out greedy accuracy
against step and against wall time; the sampled reward, mean completion length (of the sampled completions and of
the held-out greedy ones) and truncated fraction against step: one line per script (the mean over seeds) and a
band from the lowest to the highest seed.
A table per seed (start -> end accuracy and held-out greedy length, final mean sampled reward, length and truncated
fraction (means over the last 10 steps; the truncated fraction also at the first step), wall time of the whole
command, GSPO's clip fraction and PPO's critic metrics), a table per script (mean and range over seeds) and GFPO's
lengths over GRPO's go to stdout and to curves.md beside the PNG, with the CPU and versions.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["grpo", "dapo", "gspo", "gfpo", "ppo"]
COLORS = dict(grpo="tab:blue", dapo="tab:orange", gspo="tab:green", gfpo="tab:red", ppo="tab:purple")


def load(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run(script: str, seed: int, out: Path) -> float:
    """The default run of `script` with `seed`, logging to `out`; returns the command's wall time in seconds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        result = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--seed", str(seed), "--save-dir",
                                 str(out), "--keep-last", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"{script} seed {seed} failed: see {out / 'log.txt'}")
    (out / "wall_seconds").write_text(f"{wall:.1f}\n")
    return wall


LAST = 10  # "final" reward, length and truncated fraction: the mean over the last 10 steps (one step is noisy)


def summary(rows: list[dict], wall: float) -> dict:
    """The last 10 steps are the run's last 10 by number: a DAPO step in which no group survived logs no completion
    metrics and is left out of the mean, not replaced by an earlier step."""
    evals = [r for r in rows if "eval/accuracy" in r]
    steps = [r for r in rows if "completion/mean_length" in r]
    last = [r for r in steps if r["step"] > rows[-1]["step"] - LAST]
    return dict(start=evals[0]["eval/accuracy"], end=evals[-1]["eval/accuracy"],
                eval_length_start=evals[0]["eval/mean_length"], eval_length=evals[-1]["eval/mean_length"],
                reward=sum(r["reward/mean"] for r in last) / len(last),
                length=sum(r["completion/mean_length"] for r in last) / len(last),
                truncated_first=steps[0]["completion/truncated_frac"],
                truncated_last=sum(r["completion/truncated_frac"] for r in last) / len(last), wall=wall,
                signature=signature(last))


def signature(last: list[dict]) -> str:
    """What the script logs of its own (GSPO's clip fraction, PPO's critic), averaged over the last steps."""
    keys = [k for k in ("policy/clip_frac", "ppo/value_loss", "ppo/explained_variance") if k in last[0]]
    return ", ".join(f"{k} {sum(r[k] for r in last) / len(last):.3f}" for k in keys)


def table(results: dict) -> str:
    lines = [f"| script | seed | held-out accuracy, start -> end | gain | held-out greedy length, start -> end "
             f"| sampled reward, length (last {LAST} steps) | truncated, first step -> last {LAST} | wall time "
             f"| logged, last {LAST} steps |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for script, seeds in results.items():
        for seed, s in seeds.items():
            lines.append(f"| {script}.py | {seed} | {s['start']:.3f} -> {s['end']:.3f} | {s['end'] - s['start']:+.3f} "
                         f"| {s['eval_length_start']:.1f} -> {s['eval_length']:.1f} "
                         f"| {s['reward']:+.2f}, {s['length']:.1f} "
                         f"| {s['truncated_first']:.2f} -> {s['truncated_last']:.2f} "
                         f"| {s['wall']:.0f} s | {s['signature']} |")
    lines += ["", "| script | seeds | accuracy start -> end, mean (range) | held-out greedy length at the end, mean "
              "(range) | sampled reward, mean (range) | sampled length, mean (range) | wall time, mean (range) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for script, seeds in results.items():
        def spread(key, digits, values=None):
            values = values or [s[key] for s in seeds.values()]
            return f"{sum(values) / len(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
        lines.append(f"| {script}.py | {', '.join(map(str, seeds))} | {spread('start', 3)} -> {spread('end', 3)} "
                     f"| {spread('eval_length', 1)} | {spread('reward', 2)} | {spread('length', 1)} "
                     f"| {spread('wall', 0)} s |")
    if "grpo" in results and "gfpo" in results:
        both = [seed for seed in results["gfpo"] if seed in results["grpo"]]
        for key, what in [("eval_length", "held-out greedy length at the end"), ("length", "sampled length")]:
            ratios = ", ".join(f"seed {seed}: {results['gfpo'][seed][key] / results['grpo'][seed][key]:.2f}"
                               for seed in both)
            lines += ["", f"GFPO's {what} over GRPO's, same seed: {ratios}"]
    return "\n".join(lines)


def band(ax, xs: list[list[float]], ys: list[list[float]], color: str, label: str):
    """Mean over seeds as a line, lowest to highest seed as a band, on the x grid of the first seed; a marker at
    each point of a sparse series (the evaluations), so a straight segment between two reads as no measurement."""
    import numpy as np

    grid = np.array(xs[0])
    curves = np.array([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    ax.plot(grid, curves.mean(axis=0), color=color, label=label, marker="o" if len(grid) <= 20 else None, markersize=3)
    ax.fill_between(grid, curves.min(axis=0), curves.max(axis=0), color=color, alpha=0.2, linewidth=0)


def draw(runs: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(19, 9))
    axes = axes.flatten()
    for script, seeds in runs.items():
        evals = [[r for r in rows if "eval/accuracy" in r] for rows in seeds.values()]
        steps = [[r for r in rows if "completion/mean_length" in r] for rows in seeds.values()]
        color = COLORS[script]
        band(axes[0], [[r["step"] for r in e] for e in evals], [[r["eval/accuracy"] for r in e] for e in evals], color,
             f"{script}.py")
        band(axes[1], [[r["perf/elapsed"] for r in e] for e in evals], [[r["eval/accuracy"] for r in e] for e in evals],
             color, f"{script}.py")
        for ax, key in zip(axes[2:], ["reward/mean", "completion/mean_length", "eval/mean_length",
                                      "completion/truncated_frac"]):
            series = evals if key.startswith("eval/") else steps
            band(ax, [[r["step"] for r in e] for e in series], [[r[key] for r in e] for e in series], color,
                 f"{script}.py")
    for ax, (xlabel, ylabel) in zip(axes, [("step", "held-out greedy accuracy"),
                                           ("wall time of training and evaluation (s)", "held-out greedy accuracy"),
                                           ("step", "sampled reward, reward/mean (DAPO: with its penalty)"),
                                           ("step", "sampled completion length (tokens)"),
                                           ("step", "held-out greedy completion length (tokens)"),
                                           ("step", "sampled completions truncated (share)")]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    seeds = sorted({seed for s in runs.values() for seed in s})
    fig.suptitle(f"The embedded defaults (`python X.py --seed N`), seeds {', '.join(map(str, seeds))}: "
                 "mean over seeds, band from the lowest to the highest")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "curves"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "curves.png"))
    parser.add_argument("--run", action=argparse.BooleanOptionalAction, default=True,
                        help="run the missing runs (--no-run: draw from finished runs only)")
    args = parser.parse_args()
    runs, results = {}, {}
    for script in args.scripts:
        for seed in args.seeds:
            out = Path(args.runs_dir) / f"{script}-seed{seed}"
            if not (out / "wall_seconds").is_file():
                if not args.run:
                    continue
                print(f"running {script}.py --seed {seed}", flush=True)
                run(script, seed, out)
            rows = load(out)
            wall = float((out / "wall_seconds").read_text())
            runs.setdefault(script, {})[seed] = rows
            results.setdefault(script, {})[seed] = summary(rows, wall)
            s = results[script][seed]
            print(f"{script}.py seed {seed}: {s['start']:.3f} -> {s['end']:.3f}, length {s['length']:.1f}, "
                  f"truncated {s['truncated_first']:.2f} -> {s['truncated_last']:.2f}, {s['wall']:.0f} s", flush=True)
    import platform
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    text = table(results) + (f"\n\nMeasured on {cpu}, Python {platform.python_version()}, torch {version('torch')}, "
                             f"transformers {version('transformers')}.")
    print(text)
    Path(args.out).with_suffix(".md").write_text(text + "\n")
    draw(runs, Path(args.out))
    print(f"written {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
