"""OpenMoji as a datamodule: rendered into shards on first use from the installed packages."""

from __future__ import annotations

import itertools
import json
import os

from lightning.pytorch.utilities import rank_zero_info

from .prepare import read_manifest
from .text_image import TextImageDataModule


class OpenMojiDataModule(TextImageDataModule):
    """TextImageDataModule over the OpenMoji designs in ``root`` (``datamodules/openmoji.py``),
    rendered there if absent: training on ``train/``, validation on ``val/`` (the validation
    part of the held-out designs), ``test/`` left for reported tables.

    Args:
        root: folder of the rendered shards.
        resolution: rendered image side.
        split_seed: which combinations are held out.
        shard_size: designs per shard.
        image_size: training image side; None means ``resolution``.
        prepare_timeout: seconds a process waits for another one's rendering.
        hold_out: False puts every design, the held-out ones too, in training: for a judge CLIP
            that must know the test names, never for a method that is judged.
        train_fraction: train on this share of the training designs (the same held-out parts).
        render_seed: draw the designs jittered (random scale, angle and place) by this seed instead
            of centred: other pixels of the same designs, for a judge CLIP (None: centred).
        renders: jittered drawings of each design (with ``render_seed``).
        **kwargs: the TextImageDataModule arguments (batch size, workers, epoch length, ...).
    """

    dataset_name = "openmoji"  # callbacks.ShapesScore stays off on it

    def __init__(self, root: str = "data/openmoji64", resolution: int = 64, split_seed: int = 0,
                 shard_size: int = 1000, image_size: int | None = None, prepare_timeout: float = 3600.0,
                 hold_out: bool = True, train_fraction: float = 1.0, render_seed: int | None = None,
                 renders: int = 1, **kwargs):  # fmt: skip
        kwargs.setdefault("val_samples", 181)
        super().__init__(
            train_shards=os.path.join(root, "train"),
            val_shards=os.path.join(root, "val"),
            image_size=image_size or resolution,
            **kwargs,
        )
        self.root, self.resolution, self.split_seed = root, resolution, split_seed
        self.shard_size, self.prepare_timeout, self.hold_out = shard_size, prepare_timeout, hold_out
        self.train_fraction, self.render_seed, self.renders = train_fraction, render_seed, renders

    def _render(self) -> dict:
        from .openmoji import write_openmoji_shards

        return write_openmoji_shards(self.root, self.resolution, self.split_seed, self.shard_size,
                                     wait_timeout=self.prepare_timeout, hold_out=self.hold_out,
                                     train_fraction=self.train_fraction, render_seed=self.render_seed,
                                     renders=self.renders)  # fmt: skip

    def prepare_data(self) -> None:
        """Render the designs on first use (once, whatever the number of processes and nodes)."""
        if read_manifest(self.root) is None:
            rank_zero_info(f"rendering OpenMoji into {self.root} at {self.resolution} px")
        self._render()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate", "test"):
            self._render()
        super().setup(stage)

    def sample_prompts(self, n: int = 4) -> list[str]:
        """``n`` English captions of held-out validation designs, one per split in turn (tone, gender,
        colour, design): what ``callbacks.SampleGrid`` shows on this data instead of prompts
        written for another dataset."""
        path = os.path.join(self.root, "heldout.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the prompts come from the rendered data (prepare_data makes it)")
        by_split: dict[str, list[str]] = {s: [] for s in ("tone", "gender", "colour", "design")}
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row["part"] == "val":
                    by_split.setdefault(row["splits"][0], []).append(row["caption"])
        prompts = [c for group in itertools.zip_longest(*by_split.values()) for c in group if c]
        return prompts[:n]

    def check_sources(self, stage: str = "fit") -> None:
        """Nothing to check: the shards are rendered by ``prepare_data`` when they are missing."""
