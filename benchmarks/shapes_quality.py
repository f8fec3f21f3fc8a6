"""Quality and speed per sampler on a trained shapes checkpoint: the shapes scorer's
"all attributes correct" rate on held-out prompts (attribute combinations never seen in
training) and images per second, for DDPM (full steps), DDIM-50 and DPM-Solver++-20.

    python benchmarks/shapes_quality.py runs/<run>/checkpoints/last.ckpt --seeds 2
"""

import argparse
import time

import torch

from datamodules.shapes import heldout_prompts, score_batch


def from_run_config(config: str, path: str):
    """Build the model of a run from its saved ``config.yaml`` and load the checkpoint's weights."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    with open(config) as f:
        model_cfg = yaml.safe_load(f)["model"]
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningModule, "model")
    model = parser.instantiate_classes(parser.parse_object({"model": model_cfg})).model
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    return model.eval()


def load(path: str):
    """Any method's checkpoint trained through the CLI (its class comes from the saved config)."""
    from lightning.pytorch import LightningModule

    import lightning_modules.diffusion  # noqa: F401  (checkpoints may only name imported classes)

    return LightningModule.load_from_checkpoint(path, map_location="cpu", weights_only=False).eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--seeds", type=int, default=1, help="images per held-out prompt")
    p.add_argument("--batch", type=int, default=26)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--config", help="the run's config.yaml, for checkpoints that do not rebuild themselves")
    p.add_argument("--samplers", default="ddpm:1000,ddim:50,dpmpp_2m:20")
    a = p.parse_args()
    model = from_run_config(a.config, a.checkpoint) if a.config else load(a.checkpoint)
    if torch.cuda.is_available():
        model = model.cuda()
    prompts = heldout_prompts()
    print(f"{len(prompts)} held-out single-object prompts x {a.seeds} seed(s), resolution {model.image_size}")
    print(
        f"{'sampler':<12}{'steps':>6}{'all':>8}{'colour':>8}{'shape':>8}{'size':>8}{'position':>9}{'img/s':>9}"
    )
    for spec in a.samplers.split(","):
        sampler, steps = spec.split(":")
        images, attrs = [], []
        start = time.perf_counter()
        for seed in range(a.seeds):
            for i in range(0, len(prompts), a.batch):
                chunk = prompts[i : i + a.batch]
                out = model.generate([c for c, _ in chunk], seed=seed * 1000 + i, sampler=sampler, steps=int(steps),
                                     guidance_scale=a.guidance)  # fmt: skip
                images.extend(out.cpu())
                attrs.extend(at for _, at in chunk)
        rate = len(images) / (time.perf_counter() - start)
        s = score_batch(images, attrs)
        print(f"{sampler:<12}{steps:>6}{s['all']:>8.3f}{s['colour']:>8.3f}{s['shape']:>8.3f}{s['size']:>8.3f}"
              f"{s['position']:>9.3f}{rate:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
