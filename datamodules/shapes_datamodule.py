"""The embedded default data: the synthetic shapes set, rendered into shards on first use."""

from __future__ import annotations

import os
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info

from .prepare import read_manifest
from .recaption import Recaptioner, SceneLayouts
from .shapes import DATA_VERSION, heldout_prompts, vocabulary, write_shapes_shards
from .text_image import TextImageDataModule


class ShapesDataModule(TextImageDataModule):
    """TextImageDataModule over the shapes dataset in ``root``, generated there if absent.

    Args:
        root: folder of the rendered shards (``train/``, ``val/``, ``heldout.jsonl``).
        resolution: rendered image side (16, 32 or 64 are the usual choices).
        num_train: training images to render.
        num_val: validation images to render.
        data_seed: seed of the rendering (the same seed gives the same dataset, byte for byte).
        shard_size: images per shard.
        image_size: training image side; None means ``resolution``.
        val_samples: validation samples; None means ``num_val``.
        prepare_timeout: seconds a process waits for another one's rendering before it stops with
            an error that names the claim file.
        version: the data's version: 2 (the default) holds combinations of every prompt set out
            of training, with validation and test parts; 1 (single objects only) stays readable.
            It is saved in every checkpoint, and ``evaluate.py`` refuses a checkpoint of another
            version than its protocol's.
        captions: the caption each sample is trained on: ``terse`` (the default) the shard's own
            captions, ``exhaustive`` the scene's ``recaption.exhaustive_caption`` (every object's
            count, size, colour, shape, position and relation), ``mix`` the exhaustive one with
            probability ``exhaustive_fraction`` and the shard's otherwise (DALL-E 3 trained on 95%
            descriptive captions). An object that is a held-out single object is named without its
            size (``recaption.Recaptioner``), so no training caption names a held-out combination.
            The choice is made when a sample is loaded, not when shards are written: the shards,
            their manifest and the data version stay the same whatever the mode (a checkpoint's
            data is the same data), the default stream is the one it was, and the fraction can
            change between runs without rendering anything again. Validation samples follow the
            same mode.
        exhaustive_fraction: the share of exhaustive captions under ``captions: mix``.
        layouts: give every batch the scenes' true layouts (``recaption.true_boxes`` of the replayed
            objects): ``boxes`` (b, m, 4) in [0, 1], ``box_phrases`` and ``box_mask`` (b, m), padded
            to the batch's largest number of objects; for a layout-conditioned method. Made at
            load time like the captions (the shards stay the same); off by default. The boxes
            belong to the uncropped, unflipped image: ``crop: random`` and ``hflip`` are refused.
        **kwargs: the TextImageDataModule arguments (batch size, workers, epoch length, ...).
    """

    def __init__(
        self,
        root: str = "data/shapes32-v2",
        resolution: int = 32,
        num_train: int = 20000,
        num_val: int = 256,
        data_seed: int = 0,
        shard_size: int = 500,
        image_size: int | None = None,
        val_samples: int | None = None,
        prepare_timeout: float = 3600.0,
        version: int = DATA_VERSION,
        captions: Literal["terse", "exhaustive", "mix"] = "terse",
        exhaustive_fraction: float = 0.95,
        layouts: bool = False,
        **kwargs,
    ):
        vocabulary(version)  # an unknown version fails before any work
        recaptioner = Recaptioner(captions, exhaustive_fraction, data_seed, version)  # a bad mode fails here
        if not isinstance(layouts, bool):
            raise ValueError(f"data.init_args.layouts is true or false, got {layouts!r}")
        if layouts and (kwargs.get("crop", "center") != "center" or kwargs.get("hflip", False)):
            raise ValueError(
                "data.init_args.layouts gives the boxes of the whole, unflipped image: set crop: center and "
                "hflip: false, or layouts: false"
            )
        super().__init__(
            train_shards=os.path.join(root, "train"),
            val_shards=os.path.join(root, "val"),
            image_size=image_size or resolution,
            val_samples=val_samples or num_val,
            **kwargs,
        )
        self.root, self.resolution, self.prepare_timeout, self.version = root, resolution, prepare_timeout, version
        self.recaptioner = recaptioner
        self.layouts = SceneLayouts(data_seed, version) if layouts else None
        self.num_train, self.num_val, self.data_seed, self.shard_size = (
            num_train,
            num_val,
            data_seed,
            shard_size,
        )

    def prepare_data(self) -> None:
        """Render the dataset on first use. Lightning calls this on each node's local rank zero
        (``prepare_data_per_node=True``, kept: right for node-local disks and, through the claim
        of ``prepare_once``, for a shared file system, where one node renders and the others wait);
        a process outside Lightning may call it too."""
        if read_manifest(self.root) is None:
            rank_zero_info(
                f"rendering the shapes dataset into {self.root} ({self.num_train} + {self.num_val} images)"
            )
        self._render()

    def _render(self) -> dict:
        return write_shapes_shards(
            self.root, self.resolution, self.num_train, self.num_val, self.data_seed, self.shard_size,
            wait_timeout=self.prepare_timeout, version=self.version,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        """Every rank reads only a complete dataset with this datamodule's parameters: it waits for
        the manifest (rendered by another process) or renders the data itself if nobody has."""
        if stage in (None, "fit", "validate", "test"):
            self._render()
        super().setup(stage)
        if self.recaptioner.captions != "terse":
            for stream in (getattr(self, "train_stream", None), getattr(self, "val_stream", None)):
                if stream is not None:
                    stream.recaption = self.recaptioner
        if self.layouts is not None:
            for stream in (getattr(self, "train_stream", None), getattr(self, "val_stream", None)):
                if stream is not None:
                    stream.annotate = self.layouts

    def check_sources(self, stage: str = "fit") -> None:
        """Nothing to check: the shards are rendered by ``prepare_data`` when they are missing."""

    def heldout(self) -> list[tuple[str, dict]]:
        """Held-out single-object prompts (combinations absent from training) with their attributes."""
        return heldout_prompts(version=self.version)

    def state_dict(self) -> dict:
        """The skip counts, and the data's version (what ``evaluate.py`` checks a checkpoint by)."""
        return {**super().state_dict(), "shapes_version": self.version}

    def load_state_dict(self, state: dict) -> None:
        """Resume on the data the run began with: a checkpoint of another version is refused
        (checkpoints that predate the version field were trained on version 1)."""
        saved = state.get("shapes_version", 1)
        if saved != self.version:
            raise ValueError(
                f"this checkpoint was trained on shapes data version {saved}, and the run is configured "
                f"for version {self.version}: resume with --data.init_args.version {saved}, or start a new "
                "run (a resumed run must keep its data)"
            )
        super().load_state_dict(state)


def checkpoint_data_version(path: str | dict) -> int | None:
    """The shapes data version a checkpoint (its path, or the loaded dict) was trained on (1 for
    one saved before the field), or None when it was not trained on ``ShapesDataModule`` or cannot
    be read."""
    import torch

    try:
        ckpt = path if isinstance(path, dict) else torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - not a readable checkpoint: nothing to tell
        return None
    state = ckpt.get("ShapesDataModule") if isinstance(ckpt, dict) else None
    return None if state is None else int(state.get("shapes_version", 1))

