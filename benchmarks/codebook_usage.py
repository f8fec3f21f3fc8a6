"""Codebook usage at K = 1024, side by side in one run: the same VQ-VAE (configs/autoencoder/
vqvae_shapes.yaml, K raised to 1024) trained for the same steps on the same shapes batches with
(a) plain codes: Euclidean lookup in the latent dimension, no restart;
(b) l2-normalised (cosine) codes and dead-code restart;
(c) (b) with an 8-dimensional lookup (LlamaGen's setting).
Reports the fraction of codes used over the held-out validation images (``val/codebook_usage``),
the perplexity, and PSNR.

    python benchmarks/codebook_usage.py --steps 600
"""

import argparse
import os
import time

import lightning as L
import yaml
from common import build_model, model_section  # benchmarks/common.py

from datamodules import ShapesDataModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "plain": {"cosine": False, "dead_code_threshold": 0.0, "codebook_dim": None},
    "cosine + restart": {"cosine": True, "dead_code_threshold": 1.0, "codebook_dim": None},
    "cosine + restart, dim 8": {"cosine": True, "dead_code_threshold": 1.0, "codebook_dim": 8},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--codebook_size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with open(os.path.join(ROOT, "configs", "data", "shapes32.yaml")) as f:
        data_args = yaml.safe_load(f)["init_args"]
    rows = []
    for name, quantizer in VARIANTS.items():
        L.seed_everything(a.seed, verbose=False)
        section = model_section(os.path.join(ROOT, "configs", "autoencoder", "vqvae_shapes.yaml"))
        q = section["init_args"]["quantizer"]["init_args"]
        q.update(codebook_size=a.codebook_size, **quantizer)
        model = build_model(section)
        dm = ShapesDataModule(**{**data_args, "num_workers": 1, "seed": a.seed})
        trainer = L.Trainer(max_steps=a.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        start = time.perf_counter()
        trainer.fit(model, dm)
        seconds = time.perf_counter() - start
        evaluator = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        metrics = evaluator.validate(model, dm, verbose=False)[0]
        rows.append(
            (name, metrics["val/codebook_usage"], metrics["val/perplexity"], metrics["val/psnr"], seconds)
        )
        print(f"{name}: usage {rows[-1][1]:.3f}", flush=True)
    print(f"\nK = {a.codebook_size}, {a.steps} steps of batch {data_args['batch_size']} at 32 px, f4 "
          f"(64 codes per image), usage over {data_args['num_val']} held-out validation images")  # fmt: skip
    print(f"{'quantizer':<26}{'usage':>8}{'perplexity':>12}{'PSNR':>8}{'train s':>9}{'usage vs plain':>16}")
    for name, use, ppl, db, s in rows:
        print(f"{name:<26}{use:>8.3f}{ppl:>12.1f}{db:>8.2f}{s:>9.0f}{use / rows[0][1]:>15.1f}x")


if __name__ == "__main__":
    main()
