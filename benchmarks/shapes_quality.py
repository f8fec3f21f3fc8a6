"""Quality and speed on a trained shapes checkpoint of any method: the shapes scorer's
"all attributes correct" rate on held-out prompts (attribute combinations never seen in
training) and images per second; for diffusion, per sampler: DDPM (full steps), DDIM-50 and
DPM-Solver++-20. A GAN, a CVAE or a token prior has one row (``--samplers`` does not apply;
``--guidance`` and ``--sampling '{"steps": 8}'`` pass options to ``generate``).

With ``--diversity N`` it adds how different the images of one prompt are: for every held-out
prompt, N seeds, the mean absolute pixel difference (images on a [0, 1] scale) over all pairs,
averaged over the prompts. 0 is one image per prompt whatever the seed.

``edges`` is the mean absolute difference between neighbouring pixels of the generated images
over that of the shapes renderer's own images for the same prompts: 1 is the data's, below 1 is
blurrier, above 1 has more high-frequency content (noise, speckle) than the data. The last row, ``data``, is the renderer itself (its score, and with
``--diversity`` the diversity of N renders of each prompt).

``--part val`` or ``--part test`` takes one of the two disjoint halves of the held-out prompts
(compare and tune on ``val``). ``all`` comes with a prompt-level bootstrap 95% interval, and every
row after the first with the paired difference from the first row (same prompts and seeds).

    python benchmarks/shapes_quality.py runs/<run>/checkpoints/last.ckpt --seeds 2 --diversity 8
    python benchmarks/shapes_quality.py runs/<run>/checkpoints/last.ckpt --part val --seeds 8 \
        --samplers ddpm:50,ddim:50,dpmpp_2m:10,dpmpp_2m:20
"""

import argparse
import json
import time

import numpy as np
import torch
from common import from_run_config, load  # benchmarks/common.py

from datamodules.shapes import (
    DATA_VERSION,
    HELDOUT_PARTS,
    heldout_prompts,
    objects_for,
    render,
    score,
    score_batch,
)
from datamodules.shapes_datamodule import checkpoint_data_version
from evaluation.intervals import bootstrap_interval, format_interval, paired_difference


def rendered(prompts, resolution: int, seed: int) -> torch.Tensor:
    """The renderer's images of ``prompts`` (the data's look), (n, 3, s, s) in [-1, 1]."""
    out = []
    for i, (_, attrs) in enumerate(prompts):
        img = render(objects_for(attrs, np.random.default_rng([seed, i])), resolution)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def edge_energy(images: torch.Tensor) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixels."""
    x = torch.as_tensor(images).float()
    return float(((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()) / 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--seeds", type=int, default=1, help="images per held-out prompt")
    p.add_argument("--batch", type=int, default=26)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--config", help="the run's config.yaml, for checkpoints that do not rebuild themselves")
    p.add_argument("--samplers", default="ddpm:1000,ddim:50,dpmpp_2m:20")
    p.add_argument("--sampling", default="{}", help='other options of generate, as JSON: \'{"steps": 8}\'')
    p.add_argument(
        "--diversity", type=int, default=0, help="seeds per prompt for the diversity column (0: none)"
    )
    p.add_argument("--part", choices=HELDOUT_PARTS, default="all", help="which held-out prompts (tune on val)")
    p.add_argument("--data-version", type=int, help="shapes data version of the prompts (default: the checkpoint's)")
    a = p.parse_args()
    version = a.data_version or checkpoint_data_version(a.checkpoint) or DATA_VERSION
    model = from_run_config(a.config, a.checkpoint) if a.config else load(a.checkpoint)
    if torch.cuda.is_available():
        model = model.cuda()
    prompts = heldout_prompts(a.part, version)
    print(f"{len(prompts)} held-out single-object prompts (shapes data v{version}, {a.part}) x {a.seeds} seed(s), "
          f"resolution {model.image_size}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    extra = json.loads(a.sampling)
    if "sampler" in model.sampling_options():  # diffusion: one row per sampler
        rows = [(name, int(steps), {"sampler": name, "steps": int(steps), "guidance_scale": a.guidance, **extra})
                for name, steps in (spec.split(":") for spec in a.samplers.split(","))]  # fmt: skip
    else:  # one row; a token prior's guidance and decoding options through --guidance and --sampling
        guidance = {"guidance_scale": a.guidance} if a.guidance is not None else {}
        rows = [("generate", int(extra.get("steps", 1)), {**guidance, **extra})]
    print(
        f"{'method':<12}{'steps':>6}{'all':>8}{'colour':>8}{'shape':>8}{'size':>8}{'position':>9}{'img/s':>9}"
        + f"{'edges':>10}" + (f"{'diversity':>10}" if a.diversity else "")
    )
    hits = {}  # row -> (prompts, seeds) all-correct
    reference = edge_energy(torch.cat([rendered(prompts, model.image_size, seed) for seed in range(a.seeds)]))
    for name, steps, sampling in rows:
        images, attrs = [], []
        start = time.perf_counter()
        for seed in range(a.seeds):
            for i in range(0, len(prompts), a.batch):
                chunk = prompts[i : i + a.batch]
                images.extend(
                    model.generate([c for c, _ in chunk], seed=seed * 1000 + i, **sampling).float().cpu()
                )
                attrs.extend(at for _, at in chunk)
        rate = len(images) / (time.perf_counter() - start)
        s = score_batch(images, attrs)
        line = (f"{name:<12}{steps:>6}{s['all']:>8.3f}{s['colour']:>8.3f}{s['shape']:>8.3f}{s['size']:>8.3f}"
                f"{s['position']:>9.3f}{rate:>9.2f}")  # fmt: skip
        line += f"{edge_energy(torch.stack(images)) / reference:>10.3f}"
        if a.diversity:
            line += f"{diversity(model, prompts, a.diversity, sampling, a.batch):>10.4f}"
        row = f"{name}:{steps}"
        hits[row] = np.array([score(img, at)["all"] for img, at in zip(images, attrs)]).reshape(a.seeds, -1).T
        line += f"   all {format_interval(*bootstrap_interval(hits[row]))}"
        first = next(iter(hits))
        if row != first:
            line += f"   minus {first}: {format_interval(*paired_difference(hits[row], hits[first]))}"
        print(line, flush=True)
    data = torch.cat([rendered(prompts, model.image_size, seed) for seed in range(a.seeds)])
    s = score_batch(list(data), [at for _ in range(a.seeds) for _, at in prompts])
    line = (f"{'data':<12}{'':>6}{s['all']:>8.3f}{s['colour']:>8.3f}{s['shape']:>8.3f}{s['size']:>8.3f}"
            f"{s['position']:>9.3f}{'':>9}{1.0:>10.3f}")  # fmt: skip
    if a.diversity:
        renders = torch.stack([rendered(prompts, model.image_size, 1000 + s) for s in range(a.diversity)], dim=1)
        line += f"{mean_pairwise_distance(renders):>10.4f}"
    print(line)


def diversity(model, prompts, seeds: int, sampling: dict, batch: int) -> float:
    """Mean over prompts of the mean absolute pixel difference ([0, 1] scale) between the images of
    ``seeds`` different seeds."""
    chunks = []
    for i in range(0, len(prompts), batch):
        chunk = [c for c, _ in prompts[i : i + batch]]
        chunks.append(torch.stack([model.generate(chunk, seed=[s * 7919 + i + j for j in range(len(chunk))], **sampling)
                                   .float().cpu() for s in range(seeds)], dim=1))  # fmt: skip
    return mean_pairwise_distance(torch.cat(chunks))


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """``images`` (prompts, seeds, 3, h, w) in [-1, 1] -> the mean over prompts of the mean absolute
    pixel difference on a [0, 1] scale over all pairs of seeds."""
    flat = ((images + 1) / 2).flatten(2)
    n = flat.shape[1]
    d = (flat[:, :, None] - flat[:, None]).abs().mean(-1)  # (prompts, n, n)
    return float((d.sum((1, 2)) / (n * (n - 1))).mean())


if __name__ == "__main__":
    main()
