"""Zero-shot retrieval of a trained CLIP on the held-out shapes prompts: the renderer draws each
held-out prompt (attribute combinations never seen in training) once per seed, and every prompt
retrieves among the images of its seed (text to image) and every image among the prompts (image
to text). Chance is 1 / (number of prompts).

    python benchmarks/clip_retrieval.py runs/clip/checkpoints/last.ckpt --seeds 8
"""

import argparse

import torch
from shapes_quality import rendered  # benchmarks/shapes_quality.py

from datamodules.shapes import DATA_VERSION, heldout_prompts
from datamodules.shapes_datamodule import checkpoint_data_version
from lightning_modules.clip import load_clip, retrieval_recall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--seeds", type=int, default=8)
    a = p.parse_args()
    clip = load_clip(a.checkpoint)
    prompts = heldout_prompts(version=checkpoint_data_version(a.checkpoint) or DATA_VERSION)  # the prompts held out of its data
    texts = clip.encode_text([c for c, _ in prompts])
    totals: dict[str, float] = {}
    with torch.no_grad():
        for seed in range(a.seeds):
            images = clip.encode_image(rendered(prompts, clip.image_size, seed))
            for k, v in retrieval_recall(images, texts).items():
                totals[k] = totals.get(k, 0.0) + v / a.seeds
    print(f"{len(prompts)} held-out prompts x {a.seeds} renders, chance recall@1 {1 / len(prompts):.3f}, "
          f"recall@5 {min(1.0, 5 / len(prompts)):.3f}")  # fmt: skip
    print("  ".join(f"{k} {v:.3f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
