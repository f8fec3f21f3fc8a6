"""CLIP-guided VQGAN on the held-out shapes prompts, judged by the analytic scorer, and whether
the guiding CLIP is fooled: its similarity to the prompt, and its own retrieval (does the image
match its prompt best among all held-out prompts?), against the analytic all-correct rate. The
renderer's images of the same prompts give the CLIP's numbers on real data.

    python benchmarks/clip_guided.py runs/vqgan/checkpoints/last.ckpt runs/clip/checkpoints/last.ckpt \
        --steps 100 --options '{"cut_min": 0.9, "init_colour": [-0.686, -0.686, -0.686]}'
"""

import argparse
import json
import time

import torch
from shapes_quality import rendered  # benchmarks/shapes_quality.py

from datamodules.shapes import DATA_VERSION, heldout_prompts, score_batch
from datamodules.shapes_datamodule import checkpoint_data_version
from lightning_modules.clip_guided import VQGANCLIP


def clip_numbers(model: VQGANCLIP, images: torch.Tensor, texts: list[str]) -> tuple[float, float]:
    """Mean similarity to the own prompt, and the rate at which the own prompt is the most similar."""
    with torch.no_grad():
        image = model.clip.encode_image(images)
        text = model.clip.encode_text(texts)
    sims = image @ text.T
    return float(sims.diag().mean()), float((sims.argmax(1) == torch.arange(len(texts))).float().mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("autoencoder")
    p.add_argument("clip")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--batch", type=int, default=13)
    p.add_argument("--options", default="{}", help="other VQGANCLIP options, as JSON")
    p.add_argument("--grid", default=None, help="save the images here (PNG)")
    a = p.parse_args()
    model = VQGANCLIP(a.autoencoder, a.clip, steps=a.steps, **json.loads(a.options))
    prompts = heldout_prompts(version=checkpoint_data_version(a.clip) or DATA_VERSION)  # the prompts held out of its data
    texts = [c for c, _ in prompts]
    images, curves, start = [], [], time.perf_counter()
    for seed in range(a.seeds):
        for i in range(0, len(prompts), a.batch):
            images.append(model.generate(texts[i : i + a.batch], seed=[seed * 1000 + j for j in range(i, min(i + a.batch, len(prompts)))]))
            curves.append(model.last_loss_curve)
    seconds = (time.perf_counter() - start) / (len(prompts) * a.seeds)
    images = torch.cat(images)
    curve = torch.cat(curves, 1).mean(1)
    s = score_batch(list(images), [at for _ in range(a.seeds) for _, at in prompts])
    sim, r1 = clip_numbers(model, images, texts * a.seeds)
    data = torch.cat([rendered(prompts, model.image_size, seed) for seed in range(a.seeds)])
    data_sim, data_r1 = clip_numbers(model, data, texts * a.seeds)
    print(f"{len(prompts)} held-out prompts x {a.seeds} seed(s), {a.steps} steps, {seconds:.2f} s/img, options {a.options}")
    print(f"analytic: all {s['all']:.3f} | colour {s['colour']:.3f} shape {s['shape']:.3f} size {s['size']:.3f} position {s['position']:.3f}")
    print(f"CLIP loss {curve[0]:.3f} -> {curve[-1]:.3f}; CLIP similarity {sim:.3f} (renders {data_sim:.3f}); "
          f"CLIP's own R@1 among the {len(prompts)} prompts {r1:.3f} (renders {data_r1:.3f}, chance {1 / len(prompts):.3f})")  # fmt: skip
    if a.grid:
        import torchvision

        torchvision.utils.save_image((images + 1) / 2, a.grid, nrow=13)


if __name__ == "__main__":
    main()
