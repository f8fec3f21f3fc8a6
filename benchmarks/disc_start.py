"""What happens to a VQGAN or KL autoencoder when its discriminator is switched on, read from the
per-batch metrics of a run trained with a CSV logger next to W&B and ``log_every_n_steps 1``:

    python train.py fit --config configs/autoencoder/vqgan_shapes.yaml --trainer.log_every_n_steps 1 \
      --trainer.logger '[{class_path: callbacks.AutoOfflineWandbLogger, init_args: {project: t2i}},
                         {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs, name: csv}}]' \
      --run_name vqgan
    python benchmarks/disc_start.py runs/vqgan
    python benchmarks/disc_start.py runs/vqgan2 --history runs/vqgan   # vqgan2 started from a vqgan checkpoint

Reports the non-finite (NaN or inf) losses before and after ``disc_start``, the reconstruction loss
over the 200 autoencoder steps before it, the worst 100-step mean after it, and how many
autoencoder steps (from the discriminator's start) the 100-step mean takes to come back to the
pre-discriminator value after its worst point.
"""

import argparse
import csv
import glob
import math
import os

KEYS = ("train/loss", "train/rec_loss", "train/g_loss", "train/d_loss", "train/disc_weight")


def rows_of(run: str) -> list[dict]:
    """One row per training batch, in order (a resumed run's later versions continue the earlier ones)."""
    by_step: dict[int, dict] = {}
    files = sorted(glob.glob(os.path.join(run, "csv", "version_*", "metrics.csv")),
                   key=lambda p: int(p.split("version_")[-1].split(os.sep)[0]))  # fmt: skip
    for path in files:
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/rec_loss"):
                    by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", help="the run directory (with csv/version_*/metrics.csv)")
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--history", help="the run this one started from (fit --ckpt_path <its checkpoint>): its "
                   "steps before this run's first step come first")  # fmt: skip
    a = p.parse_args()
    rows = rows_of(a.run)
    if a.history and rows:
        first = int(rows[0]["step"])
        rows = [r for r in rows_of(a.history) if int(r["step"]) < first] + rows
    values = {k: [float(r[k]) if r.get(k) else None for r in rows] for k in KEYS}
    start = next((i for i, v in enumerate(values["train/g_loss"]) if v is not None), None)
    if start is None:
        raise SystemExit(f"{a.run}: the discriminator never started ({len(rows)} batches logged)")

    def nonfinite(lo: int, hi: int) -> int:
        return sum(
            any(v[i] is not None and not math.isfinite(v[i]) for v in values.values()) for i in range(lo, hi)
        )

    rec = values["train/rec_loss"]
    before = sum(rec[start - 200 : start]) / len(rec[start - 200 : start])
    means = [sum(rec[i : i + a.window]) / a.window for i in range(start, len(rec) - a.window + 1)]
    peak = means.index(max(means)) if means else 0
    # back: the first window after the worst one whose mean is at or below the value before
    back = next((i for i, m in enumerate(means) if i > peak and m <= before), None)
    weights = [w for w in values["train/disc_weight"][start:] if w is not None]
    print(f"{a.run}: {len(rows)} autoencoder steps logged, discriminator on from step {start}")
    print(f"non-finite losses: {nonfinite(0, start)} before, {nonfinite(start, len(rows))} after "
          f"({len(rows) - start} steps with the discriminator)")  # fmt: skip
    print(f"rec_loss, mean of the 200 steps before: {before:.4f}")
    if means:
        worst = max(means)
        print(f"rec_loss, worst {a.window}-step mean after: {worst:.4f} ({worst / before:.2f}x), "
              f"at +{means.index(worst)} steps; last {a.window}-step mean: {means[-1]:.4f}")  # fmt: skip
        print("back to the pre-discriminator value: "
              + (f"after {back} autoencoder steps" if back is not None else f"not within {len(means) - 1} steps"))  # fmt: skip
    if weights:
        print(f"adaptive weight: median {sorted(weights)[len(weights) // 2]:.3f}, max {max(weights):.3f}")


if __name__ == "__main__":
    main()
