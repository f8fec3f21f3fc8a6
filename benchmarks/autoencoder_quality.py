"""Reconstruction quality of a trained autoencoder on the held-out validation images of the shapes
data: the analytic shapes scorer on the originals and on their reconstructions (does the
reconstruction keep what the scorer reads: colour, shape, size, position, count, relations),
PSNR, and for VQ the fraction of codes used and the perplexity over these images.

    python benchmarks/autoencoder_quality.py runs/<run>/checkpoints/last.ckpt --data data/shapes32-v2
"""

import argparse
import os
import time

import torch

from datamodules import TextImageDataModule
from datamodules.shapes import score_batch
from lightning_modules.autoencoder import load_autoencoder, psnr
from networks.quantizer import perplexity, usage


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--data", default="data/shapes32-v2", help="the shapes root the autoencoder was trained on")
    p.add_argument("--samples", type=int, default=256, help="validation images to reconstruct")
    a = p.parse_args()
    model = load_autoencoder(a.checkpoint)
    dm = TextImageDataModule(val_shards=os.path.join(a.data, "val"), image_size=model.image_size,
                             batch_size=64, num_workers=0, val_samples=a.samples)  # fmt: skip
    dm.setup("validate")
    originals, reconstructions, attrs, counts = [], [], [], torch.zeros(getattr(model, "codebook_size", 1))
    start = time.perf_counter()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            x = batch["image"]
            if hasattr(model, "codebook_size"):
                latents, indices = model.encode(x)
                counts += torch.bincount(indices.flatten(), minlength=model.codebook_size).float()
                rec = model.decode(latents)
            else:
                rec = model.decode(model.encode(x))
            originals.append(x), reconstructions.append(rec), attrs.extend(batch["meta"])
    seconds = time.perf_counter() - start
    x, rec = torch.cat(originals), torch.cat(reconstructions)
    print(f"{a.checkpoint}: {len(x)} held-out validation images at {model.image_size} px, "
          f"f{model.downsample_factor}, latent {tuple(model.latent_shape)}")  # fmt: skip
    keys = ["all", "colour", "shape", "size", "position", "relation", "count"]
    print(f"{'images':<16}" + "".join(f"{k:>10}" for k in keys))
    for name, images in (("originals", x), ("reconstructions", rec)):
        s = score_batch(list(images), attrs)
        print(f"{name:<16}" + "".join(f"{s.get(k, float('nan')):>10.3f}" for k in keys))
    line = f"PSNR {psnr(x, rec).mean():.2f} dB, L1 {(x - rec).abs().mean():.4f}, {len(x) / seconds:.0f} img/s round trip"
    if counts.sum() > 0 and hasattr(model, "codebook_size"):
        line += f"; codebook usage {usage(counts):.3f} of {model.codebook_size}, perplexity {perplexity(counts):.1f}"
    print(line)


if __name__ == "__main__":
    main()
