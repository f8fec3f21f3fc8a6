"""Writes ``predict`` output: one PNG per prompt and seed, and a grid of them all (and, for a
reranking method's ``return_all``, every candidate with its score)."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .images import captioned_grid, slug, to_pil


class PromptImageWriter(BasePredictionWriter):
    """Saves ``<output_dir>/<index>_<prompt>_seed<seed>.png`` and ``grid.png``. When a prediction
    carries ``candidates`` ``(b, n, 3, h, w)`` and ``scores`` ``(b, n)`` (reranking), also
    ``..._candidate<j>.png`` and one line per candidate in ``scores.tsv``.

    Args:
        output_dir: target folder; None means ``<run dir>/predictions``.
        columns: grid columns.
    """

    def __init__(self, output_dir: str | None = None, columns: int = 4):
        super().__init__(write_interval="batch")
        self.output_dir, self.columns = output_dir, columns
        self._images, self._captions = [], []

    def _dir(self, trainer) -> str:
        out = self.output_dir or os.path.join(trainer.default_root_dir, "predictions")
        os.makedirs(out, exist_ok=True)
        return out

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        out = self._dir(trainer)
        for img, cap, seed, index in zip(
            prediction["image"], prediction["caption"], prediction["seed"], prediction["index"]
        ):
            to_pil(img).save(os.path.join(out, f"{int(index):04d}_{slug(cap)}_seed{int(seed)}.png"))
            self._images.append(img.cpu())
            self._captions.append(f"{cap} (seed {int(seed)})")
        if "candidates" in prediction:
            self._write_candidates(out, prediction)

    def _write_candidates(self, out: str, prediction: dict) -> None:
        path = os.path.join(out, "scores.tsv")
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write("index\tcaption\tseed\tcandidate\tscore\tchosen\n")
            for cands, scores, cap, seed, index in zip(
                prediction["candidates"], prediction["scores"], prediction["caption"], prediction["seed"], prediction["index"]
            ):
                best = int(scores.argmax())
                for j, (img, score) in enumerate(zip(cands, scores.tolist())):
                    name = f"{int(index):04d}_{slug(cap)}_seed{int(seed)}_candidate{j:02d}.png"
                    to_pil(img).save(os.path.join(out, name))
                    f.write(f"{int(index)}\t{cap}\t{int(seed)}\t{j}\t{score:.5f}\t{int(j == best)}\n")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self._images:
            grid = captioned_grid(torch.stack(self._images), self._captions, self.columns)
            grid.save(
                os.path.join(
                    self._dir(trainer),
                    f"grid_rank{trainer.global_rank}.png" if trainer.world_size > 1 else "grid.png",
                )
            )
        self._images, self._captions = [], []
