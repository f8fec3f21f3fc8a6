"""Does CLIP reranking help, judged by the analytic shapes scorer (not by CLIP)? For every held-out
prompt and seed, the method makes N candidates (``CLIPRerank.rank``, the same candidates for
every column) and the columns pick one of them:

- ``random``: a seeded random pick (what the method gives without reranking);
- ``mean``: the expected rate of a random pick, the mean over all N candidates;
- ``best-of-N``: the candidate the CLIP scores highest;
- ``oracle``: any of the N is correct (the ceiling of any reranker).

    python benchmarks/rerank.py runs/<method>/checkpoints/last.ckpt runs/clip/checkpoints/last.ckpt --candidates 16 --seeds 4
"""

import argparse
import json
import time

import torch

from datamodules.shapes import DATA_VERSION, heldout_prompts, score_batch
from datamodules.shapes_datamodule import checkpoint_data_version
from lightning_modules.clip_guided import CLIPRerank


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("generator")
    p.add_argument("clip")
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--seeds", type=int, default=4, help="rerankings per held-out prompt")
    p.add_argument("--batch", type=int, default=104, help="images per generator call")
    p.add_argument("--sampling", default="{}", help="generate options of the method, as JSON")
    a = p.parse_args()
    model = CLIPRerank(a.generator, a.clip, candidates=a.candidates, batch_size=a.batch, sampling=json.loads(a.sampling))
    prompts = heldout_prompts(version=checkpoint_data_version(a.generator) or DATA_VERSION)  # the prompts held out of its data
    n = a.candidates
    print(f"{type(model.method).__name__}: {len(prompts)} held-out prompts x {a.seeds} seed(s), {n} candidates each")
    picks: dict[str, list] = {"random": [], "best-of-N": []}
    correct, attrs, start = [], [], time.perf_counter()
    pick = torch.Generator().manual_seed(0)
    for seed in range(a.seeds):
        images, scores = model.rank([c for c, _ in prompts], seed=[seed * 1000 + i for i in range(len(prompts))])
        ok = torch.tensor([[score_batch([img], [at])["all"] for img in cands] for cands, (_, at) in zip(images, prompts)])
        correct.append(ok)  # (prompts, n): is candidate j of prompt i all correct
        picks["random"].append(ok[torch.arange(len(prompts)), torch.randint(0, n, (len(prompts),), generator=pick)])
        picks["best-of-N"].append(ok[torch.arange(len(prompts)), scores.argmax(1)])
        attrs.extend(at for _, at in prompts)
    seconds = time.perf_counter() - start
    ok = torch.cat(correct)
    rows = {
        "random": float(torch.cat(picks["random"]).mean()),
        "mean": float(ok.mean()),
        f"best-of-{n}": float(torch.cat(picks["best-of-N"]).mean()),
        "oracle": float(ok.max(1).values.mean()),
    }
    print(" | ".join(f"{k} {v:.3f}" for k, v in rows.items()))
    print(f"gain of best-of-{n} over random: {100 * (rows[f'best-of-{n}'] - rows['random']):+.1f} points, "
          f"over the mean: {100 * (rows[f'best-of-{n}'] - rows['mean']):+.1f}; "
          f"{seconds / ok.shape[0]:.2f} s per reranked image ({n} candidates)")  # fmt: skip


if __name__ == "__main__":
    main()
