"""Does an OpenMoji judge read a design or the exact pixels it was trained on?

Each judge names the test designs' renders among 100 names (R-precision, 99 distractors of the
other test designs, English), once on the centred drawings (the methods' data, and the table's
real renders) and once on jittered drawings of a render seed that neither judge trained on. A
judge that learnt the designs loses little between the two; one that learnt the centred pixels
loses much. Side by side in one run:

    python benchmarks/judge_pixels.py runs/compare/train/openmoji_clip_judge_centred/checkpoints/last.ckpt \\
        runs/compare/train/openmoji_clip_judge/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datamodules import openmoji as O  # noqa: E402
from evaluation.metrics import r_precision  # noqa: E402


def test_designs(root: str, part: str = "test") -> list[tuple[O.Design, str]]:
    """The held-out designs of ``part`` with their canonical English captions."""
    by_key = {d.key: d for d in O.catalogue()}
    with open(os.path.join(root, "heldout.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [(by_key[r["key"]], r["caption"]) for r in rows if r["part"] == part]


def drawings(designs: list[O.Design], resolution: int, render_seed: int | None) -> torch.Tensor:
    """(n, 3, s, s) in [-1, 1]: each design drawn centred (``render_seed`` None) or jittered."""
    font = O.design_font(resolution)
    images = [np.asarray(O.render(d, resolution, font, O._jitter(render_seed, d, 0)), dtype=np.float32) for d in designs]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("judges", nargs="+", help="CLIP checkpoints")
    p.add_argument("--root", default="data/openmoji32", help="the methods' data (its heldout.jsonl)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--render-seed", type=int, default=99, help="a jitter no judge trained on")
    a = p.parse_args(argv)
    from lightning_modules.clip import load_clip

    items = test_designs(a.root)
    designs, captions = [d for d, _ in items], [c for _, c in items]
    views = {"centred": drawings(designs, a.resolution, None), f"jittered (seed {a.render_seed})": drawings(designs, a.resolution, a.render_seed)}
    print(f"{len(designs)} test designs, 99 distractors each, English names\n")
    print("| judge | " + " | ".join(views) + " | ratio |")
    print("|---|" + "---|" * (len(views) + 1))
    for path in a.judges:
        clip = load_clip(path)
        with torch.no_grad():
            cells = {name: r_precision(clip, x, captions, captions) for name, x in views.items()}
        first, second = (cells[k][0] for k in views)
        row = " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells.values())
        print(f"| {path} | {row} | {second / first if first else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
