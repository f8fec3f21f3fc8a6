"""unCLIP's image variations, judged by a CLIP that did not make them: is a variation nearer to its
source than to two unrelated images? And the prior's samples against the source renders: which of
prior and decoder loses the prompt?

Sources are the renderer's images of the held-out prompts of one part (every set); each gets one
variation: the decoder from the source's embedding under the unCLIP's own CLIP, with the empty
caption, as the paper's variations. The judge (a CLIP of its own seed and data, not unCLIP's;
refused by ``evaluation.lineage.judge_problems`` as ``evaluate.py`` refuses it) embeds sources and
variations; for each variation it compares the cosine to its source with the cosines to two other
sources of the same prompt set and, where the set has them, of the same colours (other prompts:
"unrelated" images of the same kind and colours, so that "nearest of 3" asks for more than the
colours; most pairs of a set differ in colours). The nearest of 3 against two unrelated sources of
any colours, the earlier baseline, is printed beside it. A second render of the source's prompt
(another seed) is the ceiling: what a perfect variation, the same content drawn anew, scores. The
analytic scorer says whether a variation still satisfies its source's prompt.

The prior's samples live in unCLIP's own CLIP space, so a second table reads them there: the
cosine of the prior's sampled embedding for each prompt to the CLIP embedding of the source render
of that prompt, and whether that source is the nearest of all sources (retrieval), beside a second
render's embedding (the ceiling) and the variation's (the decoder from the true embedding, read
back by the same CLIP). Intervals: bootstrap over sources.

    python benchmarks/unclip_variations.py runs/compare/train/unclip_prior/checkpoints/last.ckpt \\
        runs/compare/train/unclip_decoder/checkpoints/last.ckpt runs/compare/train/clip_judge/checkpoints/last.ckpt
"""

import argparse
import json
import time

import numpy as np
import torch
from shapes_quality import rendered  # benchmarks/shapes_quality.py

from datamodules.shapes import PROMPT_SETS, prompt_set, scene_key, score
from evaluation.intervals import bootstrap_interval, format_interval
from evaluation.lineage import judge_problems
from lightning_modules.clip import load_clip
from lightning_modules.unclip import UnCLIP


def judge_check(judge: str, prior: str, decoder: str) -> list[str]:
    """``evaluate.py``'s rule for a judging CLIP: refused (SystemExit) when it shares its ancestry
    with the CLIP of the prior and decoder; the notes where that cannot be told (no lineage)."""
    spec = {"name": "unclip", "model": {"init_args": {"prior": prior, "decoder": decoder}}}
    errors, notes = judge_problems({"clip": judge, "methods": [spec]})
    if errors:
        raise SystemExit("error: " + "; ".join(errors))
    return notes


def colours(attrs: dict) -> frozenset:
    return frozenset(o["colour"] for o in attrs["objects"])


def unrelated(items: list[tuple[str, str, dict]], seed: int, same_colours: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """For each source, two sources of other prompts of its own prompt set, drawn at random; with
    ``same_colours`` first from those with the source's colour set, the rest (where fewer than two
    have it) from the others. Returns the (n, 2) indices and, per source, how many of the two have
    its colours."""
    rng, out, matched = np.random.default_rng(seed), [], []
    sets = np.asarray([name for name, _, _ in items])
    keys = [scene_key(at) for _, _, at in items]
    cols = [colours(at) for _, _, at in items]
    for i, (name, _, _) in enumerate(items):
        pool = [j for j in np.flatnonzero(sets == name) if keys[j] != keys[i]]
        same = [j for j in pool if cols[j] == cols[i]] if same_colours else []
        pick = list(rng.choice(same, size=min(2, len(same)), replace=False)) if same else []
        rest = [j for j in pool if j not in same]
        pick += list(rng.choice(rest, size=2 - len(pick), replace=False)) if len(pick) < 2 else []
        out.append(pick)
        matched.append(sum(cols[j] == cols[i] for j in pick))
    return np.asarray(out), np.asarray(matched)


def cosines(c: torch.Tensor, s: torch.Tensor, others: np.ndarray) -> dict[str, np.ndarray]:
    """Unit embeddings ``c`` of candidates against ``s`` of the sources: the cosine to its own
    source, the mean to its two unrelated ones, whether its source is the nearest of the three,
    and whether it is the nearest of every source (retrieval)."""
    own = (c * s).sum(-1).numpy()
    other = torch.stack([(c * s[others[:, k]]).sum(-1) for k in range(2)], 1).numpy()
    retrieved = ((c @ s.T).argmax(1) == torch.arange(len(c))).float().numpy()
    return {"own": own, "other": other.mean(1), "nearest": (own > other.max(1)).astype(float), "retrieved": retrieved}


def judge_table(judge, sources: torch.Tensor, images: dict[str, torch.Tensor], prompts: list, others: np.ndarray,
                any_colours: np.ndarray, full: np.ndarray, seed: int) -> dict:  # fmt: skip
    """The judge's table: each kind of image against its source and its two unrelated sources."""
    print("| images | judge cos to source | to 2 unrelated (same set, same colours) | source nearest of 3 "
          "(chance 0.333) | nearest of 3, unrelated of any colours | all-correct for the source's prompt |\n"
          "|---|---|---|---|---|---|")  # fmt: skip
    result = {}
    with torch.no_grad():
        s = judge.encode_image(sources)
        embedded = {label: judge.encode_image(x) for label, x in images.items()}
    for label, x in images.items():
        j = cosines(embedded[label], s, others)
        cells = {k: bootstrap_interval(v, seed=seed) for k, v in {
            "own": j["own"], "other": j["other"], "nearest": j["nearest"],
            "nearest_any_colours": cosines(embedded[label], s, any_colours)["nearest"],
            "correct": np.asarray([float(score(img, at)["all"]) for img, (_, at) in zip(x, prompts)]),
            "nearest_both_same_colours": j["nearest"][full],
            "own - other": j["own"] - j["other"]}.items()}  # fmt: skip
        result[label] = cells
        print(f"| {label} | " + " | ".join(format_interval(*cells[k]) for k in
                                           ("own", "other", "nearest", "nearest_any_colours", "correct")) + " |")  # fmt: skip
    for label, cells in result.items():
        print(f"{label}: nearest of 3 over the {full.sum()} sources whose two unrelated both have its colours "
              f"{format_interval(*cells['nearest_both_same_colours'])}; cos to source - cos to unrelated "
              f"{format_interval(*cells['own - other'])}")  # fmt: skip
    return result


def own_clip_table(clip, sources: torch.Tensor, embeds: dict[str, torch.Tensor], others: np.ndarray, seed: int) -> dict:
    """unCLIP's own CLIP: each unit embedding (the prior's samples, images' embeddings) against the
    source render's of its prompt."""
    n = len(sources)
    print(f"| embedding | cos to the source render | to 2 unrelated (same set, same colours) | source nearest of 3 "
          f"| source retrieved among all {n} (chance {1 / n:.3f}) |\n|---|---|---|---|---|")  # fmt: skip
    with torch.no_grad():
        s = clip.encode_image(sources)
    result = {}
    for label, embed in embeds.items():
        cells = {k: bootstrap_interval(v, seed=seed) for k, v in cosines(embed, s, others).items()}
        result[label] = cells
        print(f"| {label} | " + " | ".join(format_interval(*cells[k]) for k in ("own", "other", "nearest", "retrieved"))
              + " |")  # fmt: skip
    return result


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
    notes = judge_check(a.judge, a.prior, a.decoder)
    for note in notes:
        print(f"note: {note}")
    model = UnCLIP(a.prior, a.decoder, decoder_sampling={"sampler": "dpmpp_2m", "steps": a.steps,
                                                         "guidance_scale": a.guidance})  # fmt: skip
    judge = load_clip(a.judge, option="judge")
    items = [(name, c, at) for name in PROMPT_SETS for c, at in prompt_set(name, part=a.part, seed=a.seed)]
    prompts = [(c, at) for _, c, at in items]
    n = len(items)
    sources = rendered(prompts, model.decoder.image_size, a.seed)
    again = rendered(prompts, model.decoder.image_size, a.seed + 1)  # the same prompts drawn anew
    batches = [(i, [a.seed * 100_003 + j for j in range(i, min(i + a.batch, n))]) for i in range(0, n, a.batch)]
    start = time.perf_counter()
    variations = torch.cat([model.variations(sources[i : i + a.batch], seed=seeds) for i, seeds in batches])
    seconds = time.perf_counter() - start
    variations = variations.clamp(-1, 1)
    sampled = torch.cat([model.prior.sample([c for c, _ in prompts[i : i + a.batch]], seed=seeds)
                         for i, seeds in batches])  # fmt: skip
    others, matched = unrelated(items, a.seed)
    any_colours, _ = unrelated(items, a.seed, same_colours=False)
    full = matched == 2
    result = {"sources": n, "part": a.part, "seconds_per_image": seconds / n, "judge_notes": notes,
              "unrelated_same_colours": float(matched.mean() / 2), "sources_both_same_colours": int(full.sum())}  # fmt: skip
    print(f"{n} sources ({a.part} part, every set), one variation each, {seconds / n:.2f} s/img")
    print(f"unrelated images with the source's colour set: {matched.sum()} of {2 * n} ({matched.mean() / 2:.3f}); "
          f"both for {full.sum()} sources, one for {(matched == 1).sum()}, none for {(matched == 0).sum()} "
          "(their set has too few other prompts of those colours: the rest are of the set's other colours)")  # fmt: skip
    result["judge"] = judge_table(judge, sources, {"unCLIP variation": variations, "another render (ceiling)": again},
                                  prompts, others, any_colours, full, a.seed)  # fmt: skip
    print("\nunCLIP's own CLIP (where the prior's samples live): each embedding against the source render's")
    with torch.no_grad():
        embeds = {"prior's sample for the prompt": sampled,
                  "another render of the prompt (ceiling)": model.clip.encode_image(again),
                  "unCLIP variation (decoder from the source's embedding)": model.clip.encode_image(variations)}  # fmt: skip
    result["own CLIP"] = own_clip_table(model.clip, sources, embeds, others, a.seed)
    if a.grid:
        from torchvision.utils import save_image

        pick = np.random.default_rng(a.seed).choice(n, size=min(16, n), replace=False)
        save_image(torch.cat([sources[pick], variations[pick]]) / 2 + 0.5, a.grid, nrow=len(pick), padding=1)
        print(f"grid (sources over their variations): {a.grid}")
    if a.json:
        json.dump(result, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
