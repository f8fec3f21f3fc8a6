"""unCLIP's image variations, judged by a CLIP that did not make them: is a variation nearer to its
source than to two unrelated images?

Sources are the renderer's images of the held-out prompts of one part (every set); each gets one
variation: the decoder from the source's embedding under the unCLIP's own CLIP, with the empty
caption, as the paper's variations. The judge (a CLIP of its own seed and data, not unCLIP's)
embeds sources and variations; for each variation it compares the cosine to its source with the
cosines to two other sources of the same prompt set (other prompts: "unrelated" images of the same
kind, the harder comparison). A second render of the source's prompt (another seed) is the
ceiling: what a perfect variation, the same content drawn anew, scores. The analytic scorer says
whether a variation still satisfies its source's prompt. Intervals: bootstrap over sources.

    python benchmarks/unclip_variations.py runs/compare/train/unclip_prior/checkpoints/last.ckpt \\
        runs/compare/train/unclip_decoder/checkpoints/last.ckpt runs/compare/train/clip_judge/checkpoints/last.ckpt
"""

import argparse
import json
import time

import numpy as np
import torch
from shapes_quality import rendered  # benchmarks/shapes_quality.py

from datamodules.shapes import PROMPT_SETS, prompt_set, score
from evaluation.intervals import bootstrap_interval, format_interval
from lightning_modules.clip import load_clip
from lightning_modules.unclip import UnCLIP


def unrelated(sets: list[str], seed: int) -> np.ndarray:
    """For each source, two other sources of its own prompt set, drawn at random: (n, 2) indices."""
    rng, names, out = np.random.default_rng(seed), np.asarray(sets), []
    for i, name in enumerate(sets):
        pool = np.flatnonzero((names == name) & (np.arange(len(sets)) != i))
        out.append(rng.choice(pool, size=2, replace=False))
    return np.stack(out)


def judged(judge, candidates: torch.Tensor, sources: torch.Tensor, others: np.ndarray) -> dict[str, np.ndarray]:
    """The judge's cosine of each candidate to its source and to its two unrelated sources, and
    whether the source is the nearest of the three."""
    with torch.no_grad():
        c, s = judge.encode_image(candidates), judge.encode_image(sources)
    own = (c * s).sum(-1).numpy()
    other = torch.stack([(c * s[others[:, k]]).sum(-1) for k in range(2)], 1).numpy()
    return {"own": own, "other": other.mean(1), "nearest": (own > other.max(1)).astype(float)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("prior")
    p.add_argument("decoder")
    p.add_argument("judge", help="a CLIP that is not the one the prior and decoder were trained on")
    p.add_argument("--part", default="test", choices=["val", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0, help="of the image embedding, the caption being empty")
    p.add_argument("--grid", default=None, help="save sources over variations here (PNG), 16 columns")
    p.add_argument("--json", default=None, help="write the numbers here")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    model = UnCLIP(a.prior, a.decoder, decoder_sampling={"sampler": "dpmpp_2m", "steps": a.steps,
                                                         "guidance_scale": a.guidance})  # fmt: skip
    judge = load_clip(a.judge, option="judge")
    if (judge.lineage or {}).get("origin") == (model.clip.lineage or {}).get("origin", "none"):
        raise SystemExit(f"judge {a.judge} shares its ancestry with unCLIP's CLIP: give an independent one")
    items = [(name, c, at) for name in PROMPT_SETS for c, at in prompt_set(name, part=a.part, seed=a.seed)]
    prompts = [(c, at) for _, c, at in items]
    sources = rendered(prompts, model.decoder.image_size, a.seed)
    again = rendered(prompts, model.decoder.image_size, a.seed + 1)  # the same prompts drawn anew
    start, variations = time.perf_counter(), []
    for i in range(0, len(items), a.batch):
        seeds = [a.seed * 100_003 + j for j in range(i, min(i + a.batch, len(items)))]
        variations.append(model.variations(sources[i : i + a.batch], seed=seeds))
    seconds = time.perf_counter() - start
    variations = torch.cat(variations).clamp(-1, 1)
    others = unrelated([name for name, _, _ in items], a.seed)
    result = {"sources": len(items), "part": a.part, "seconds_per_image": seconds / len(items)}
    print(f"{len(items)} sources ({a.part} part, every set), one variation each, {seconds / len(items):.2f} s/img")
    print("| images | judge cos to source | to 2 unrelated (same set) | source nearest of 3 (chance 0.333) "
          "| all-correct for the source's prompt |\n|---|---|---|---|---|")  # fmt: skip
    for label, images in (("unCLIP variation", variations), ("another render (ceiling)", again)):
        j = judged(judge, images, sources, others)
        correct = np.asarray([float(score(img, at)["all"]) for img, (_, at) in zip(images, prompts)])
        cells = {k: bootstrap_interval(v, seed=a.seed) for k, v in {**j, "correct": correct}.items()}
        result[label] = cells
        print(f"| {label} | " + " | ".join(format_interval(*cells[k]) for k in ("own", "other", "nearest", "correct"))
              + " |")  # fmt: skip
    gap = judged(judge, variations, sources, others)
    result["own - other"] = bootstrap_interval(gap["own"] - gap["other"], seed=a.seed)
    print(f"variation: cos to source - cos to unrelated {format_interval(*result['own - other'])}")
    if a.grid:
        from torchvision.utils import save_image

        pick = np.random.default_rng(a.seed).choice(len(items), size=min(16, len(items)), replace=False)
        save_image(torch.cat([sources[pick], variations[pick]]) / 2 + 0.5, a.grid, nrow=len(pick), padding=1)
        print(f"grid (sources over their variations): {a.grid}")
    if a.json:
        json.dump(result, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
