"""The text-image datamodule shared by every method.

Batches are dicts: ``image`` (b, 3, h, w) float in [-1, 1], ``caption`` list[str],
``key`` list[str], ``meta`` list[dict]; with layouts (``ShardStream.annotate`` giving samples a
``layout``), also ``boxes`` (b, m, 4), ``box_phrases`` (b lists of m str) and ``box_mask`` (b, m)
bool, padded to the batch's largest number of objects ``m`` (``pad_layouts``).

Training reads an endless stream: the shard list is split explicitly by rank and by
worker, each worker reshuffles its shards every pass, and the loader hands out exactly
``train_batches_per_epoch`` batches per epoch on every rank, so DDP ranks never disagree on
the batch count. Validation is a fixed, deterministic set of ``val_samples`` samples dealt
round-robin to ranks and workers, the same count on every rank.
"""

from __future__ import annotations

import glob
import io
import math
import os
import random
import signal
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from networks.noise import run_seed, stream_seed

from .shards import (
    IMAGE_EXTENSIONS,
    SampleError,
    SkipCounter,
    decode_image,
    expand_urls,
    iter_tar_groups,
    parse_captions,
    parse_meta,
)

SKIPS_KEY = "_skips"  # private batch entry carrying a worker's skip counts; removed before transfer


class ImageTransform:
    """PIL image -> (3, image_size, image_size) float tensor in [-1, 1]: the shorter side resized
    to ``image_size``, a square crop (centred, or at a random offset), an optional horizontal flip.

    The random choices come from the ``rng`` the caller passes (the shard stream's own, one per
    rank and worker), never from torch's global RNG, so they differ between ranks and workers and
    repeat under the same seed. Without an ``rng`` the crop is centred and nothing is flipped.
    """

    def __init__(self, image_size: int, crop: Literal["center", "random"] = "center", hflip: bool = False):
        self.image_size, self.crop, self.hflip = image_size, crop, hflip

    def __call__(self, image, rng: random.Random | None = None) -> torch.Tensor:
        s = self.image_size
        x = v2.functional.resize(v2.functional.to_image(image), s, antialias=True)  # (3, h, w) uint8
        h, w = x.shape[-2:]
        if self.crop == "random" and rng is not None:
            top, left = rng.randint(0, h - s), rng.randint(0, w - s)
        else:
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        x = x[:, top : top + s, left : left + s]
        if self.hflip and rng is not None and rng.random() < 0.5:
            x = x.flip(-1)
        return x.float().div(127.5).sub(1.0)


def build_transform(image_size: int, crop: str = "center", hflip: bool = False) -> ImageTransform:
    """PIL image (and an rng) -> (3, image_size, image_size) float tensor in [-1, 1]."""
    return ImageTransform(image_size, crop, hflip)


class ShardStream(IterableDataset):
    """Decoded samples from tar shards, split by rank and worker, with skipped samples counted.

    ``mode="train"``: an endless, reshuffled stream; ``mode="val"``: exactly
    ``ceil(val_samples / (world_size * workers))`` samples per worker, dealt round-robin.
    """

    def __init__(
        self,
        urls: list[str],
        transform,
        mode: Literal["train", "val"],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        val_samples: int = 256,
        shuffle_buffer: int = 512,
        max_pixels: int = 16_000_000,
        image_size: int | None = None,
        tokens_shape: tuple[int, ...] | None = None,
        clip_embed_dim: int | None = None,
    ):
        self.urls, self.transform, self.mode = list(urls), transform, mode
        self.tokens_shape = tuple(tokens_shape) if tokens_shape is not None else None
        self.clip_embed_dim = clip_embed_dim
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.val_samples, self.shuffle_buffer = val_samples, shuffle_buffer
        self.max_pixels, self.image_size = max_pixels, image_size
        self.start_step = 0  # set by the datamodule so a resumed run continues on a fresh stream
        # (key, meta, caption, rng) -> the caption to train on, set by a datamodule that rewrites
        # captions at load time (the shapes set's exhaustive captions); None keeps the shard's
        self.recaption = None
        # (key, meta) -> extra sample fields (the shapes set's ``layout``), set by a datamodule that
        # annotates samples at load time; it may raise ``SampleError`` to skip and count a sample
        self.annotate = None

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def decode(
        self, key: str, members: dict[str, bytes], skips: SkipCounter, rng: random.Random
    ) -> dict | None:
        try:
            if "__too_large__" in members:
                raise SampleError("too_large")
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if image_ext is None:
                raise SampleError("no_image")
            if "txt" not in members:
                raise SampleError("no_caption")
            captions = parse_captions(members["txt"])
            meta = parse_meta(members.get("json"))
            image = decode_image(members[image_ext], self.max_pixels, self.image_size)
            tokens = (
                decode_tokens(members.get(TOKENS_MEMBER), self.tokens_shape) if self.tokens_shape else None
            )
            embed = (
                decode_embedding(members.get(CLIP_MEMBER), self.clip_embed_dim) if self.clip_embed_dim else None
            )
            extra = self.annotate(key, meta) if self.annotate is not None else {}
        except SampleError as err:
            skips.add(err.reason)
            return None
        caption = rng.choice(captions) if self.mode == "train" else captions[0]
        if self.recaption is not None:
            caption = self.recaption(key, meta, caption, rng)
        sample = {"image": self.transform(image, rng), "caption": caption, "key": key, "meta": meta, **extra}
        if tokens is not None:
            sample["tokens"] = tokens
        if embed is not None:
            sample["clip_image_embed"] = embed
        return sample

    def _samples(self, urls: list[str], skips: SkipCounter, rng: random.Random, keep=None) -> Iterator[dict]:
        index = 0
        for url in urls:
            for key, members in iter_tar_groups(url, skips):
                mine = keep is None or keep(index)
                index += 1
                if mine:
                    sample = self.decode(key, members, skips, rng)
                    if sample is not None:
                        yield sample

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        skips = SkipCounter()
        # one stream per rank and worker (slot), per resume point and split: shard order, caption
        # choice, crops and flips differ between slots and repeat under the same seed
        rng = random.Random(stream_seed(self.seed, slot, self.start_step, self.mode))
        if get_worker_info() is not None:  # a worker's global RNGs, for any user transform that uses them
            worker_seed = stream_seed(self.seed, slot, self.start_step, self.mode, "worker")
            torch.manual_seed(worker_seed)
            np.random.seed(worker_seed % 2**32)
            random.seed(worker_seed)
        if self.mode == "val":
            stream = self._val_stream(slot, slots, skips, rng)
        else:
            stream = self._train_stream(slot, slots, skips, rng)
        for sample in stream:
            sample[SKIPS_KEY] = (f"{self.mode}/{slot}", dict(skips.counts))
            yield sample

    def _val_stream(self, slot: int, slots: int, skips: SkipCounter, rng: random.Random) -> Iterator[dict]:
        quota = math.ceil(self.val_samples / slots)
        produced = 0
        while produced < quota:  # cycle through the set if it is smaller than asked for
            before = produced
            for sample in self._samples(self.urls, skips, rng, keep=lambda i: i % slots == slot):
                yield sample
                produced += 1
                if produced == quota:
                    return
            if produced == before:
                raise RuntimeError(
                    f"validation worker {slot} found no readable sample in {len(self.urls)} shard(s) "
                    f"({dict(skips.counts)}); check data.val_shards"
                )

    def _train_stream(self, slot: int, slots: int, skips: SkipCounter, rng: random.Random) -> Iterator[dict]:
        shards, stride, offset = shard_assignment(len(self.urls), slot, slots)
        urls = [self.urls[i] for i in shards]
        keep = None if stride == 1 else (lambda i: i % stride == offset)
        buffer: list[dict] = []
        while True:
            rng.shuffle(urls)
            produced = 0
            for sample in self._samples(urls, skips, rng, keep):
                produced += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], sample = sample, buffer[i]
                yield sample
            if produced == 0:
                raise RuntimeError(
                    f"training worker {slot} found no readable sample in its {len(urls)} shard(s) "
                    f"({dict(skips.counts)}); check data.train_shards"
                )
            rng.shuffle(buffer)
            while len(buffer) > self.shuffle_buffer // 2:
                yield buffer.pop()


def shard_assignment(num_shards: int, slot: int, slots: int) -> tuple[list[int], int, int]:
    """What training slot ``slot`` of ``slots`` (rank x worker) reads in each pass over the data:
    ``(shard indices, stride, offset)``, keeping the samples whose running index ``i`` in its
    shards has ``i % stride == offset``. Every sample is read by exactly one slot per pass. With
    at least as many shards as slots, each slot reads whole shards (every ``slots``-th one); with
    fewer, the slots that share a shard read it in turn, one sample in ``stride`` each (each reads
    the whole file and decodes its share)."""
    if num_shards >= slots:
        return list(range(slot, num_shards, slots)), 1, 0
    shard = slot % num_shards
    sharing = len(range(shard, slots, num_shards))  # the slots whose share is in this shard
    return [shard], sharing, slot // num_shards


TOKENS_MEMBER = "tokens.npy"  # pre-computed image tokens (scripts/tokenize_shards.py)
CLIP_MEMBER = "clip.npy"  # pre-computed CLIP image embeddings (scripts/embed_shards.py)


def _load_array(raw: bytes | None, shape: tuple[int, ...], kinds: str, what: str) -> np.ndarray:
    """A ``.npy`` member of ``shape`` and a dtype of ``kinds`` (numpy's kind letters), loaded
    with ``allow_pickle=False`` (a member is data, never code). Missing, unreadable, of another
    shape or dtype: a ``SampleError`` (``no_<what>`` or ``bad_<what>``), so the sample is skipped
    and counted."""
    if raw is None:
        raise SampleError(f"no_{what}")
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise SampleError(f"bad_{what}") from None
    if array.shape != tuple(shape) or array.dtype.kind not in kinds:
        raise SampleError(f"bad_{what}")
    return array


def decode_tokens(raw: bytes | None, shape: tuple[int, ...]) -> torch.Tensor:
    """A ``{key}.tokens.npy`` member -> a long tensor of ``shape`` (integer dtypes only)."""
    return torch.from_numpy(_load_array(raw, shape, "iu", "tokens").astype(np.int64))


def decode_embedding(raw: bytes | None, dim: int) -> torch.Tensor:
    """A ``{key}.clip.npy`` member -> a float tensor (dim,) (float dtypes only)."""
    return torch.from_numpy(_load_array(raw, (dim,), "f", "clip_embed").astype(np.float32))


def _ignore_ctrl_c(worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which stops at a step boundary
    and saves. A SIGTERM to the whole process group (``kill -- -PGID``, ``timeout``, a container's
    stop) would otherwise end a worker first, and the main process would die of the lost worker
    before it could save. The workers still end with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def pad_layouts(layouts: list[list[tuple[str, tuple[float, float, float, float]]]]):
    """One ``[(phrase, (x0, y0, x1, y1)), ...]`` per sample -> boxes (b, m, 4) float, phrases
    (b lists of m str, "" where padded) and a mask (b, m) bool of the real objects, ``m`` the
    largest number of objects."""
    m = max((len(layout) for layout in layouts), default=0)
    boxes = torch.zeros(len(layouts), m, 4)
    mask = torch.zeros(len(layouts), m, dtype=torch.bool)
    phrases = []
    for i, layout in enumerate(layouts):
        phrases.append([phrase for phrase, _ in layout] + [""] * (m - len(layout)))
        if layout:
            boxes[i, : len(layout)] = torch.tensor([list(box) for _, box in layout], dtype=torch.float32)
            mask[i, : len(layout)] = True
    return boxes, phrases, mask


def collate(samples: list[dict]) -> dict:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if "tokens" in samples[0]:
        batch["tokens"] = torch.stack([s["tokens"] for s in samples])
    if "clip_image_embed" in samples[0]:
        batch["clip_image_embed"] = torch.stack([s["clip_image_embed"] for s in samples])
    if "layout" in samples[0]:
        batch["boxes"], batch["box_phrases"], batch["box_mask"] = pad_layouts([s["layout"] for s in samples])
    if SKIPS_KEY in samples[-1]:
        batch[SKIPS_KEY] = samples[-1][SKIPS_KEY]
    return batch


class FixedLengthLoader:
    """Hands out exactly ``length`` batches per epoch from one long-lived iterator of ``loader``."""

    def __init__(self, loader: DataLoader, length: int, on_new_iterator=None):
        self.loader, self.length, self.on_new_iterator = loader, length, on_new_iterator
        self._iterator = None

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        for _ in range(self.length):
            if self._iterator is None:
                if self.on_new_iterator is not None:
                    self.on_new_iterator()
                self._iterator = iter(self.loader)
            yield next(self._iterator)


def _prompt_collate(items: list[dict]) -> dict:
    return {k: [it[k] for it in items] for k in items[0]}


def load_prompts(prompts: str | list[str] | None) -> list[str]:
    """A list of prompts, a path to a text file (one prompt a line), or one prompt."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        if os.path.isfile(prompts):
            with open(prompts, encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
        return [prompts]
    return [p for p in prompts if p.strip()]


class TextImageDataModule(LightningDataModule):
    """img2dataset-format shards -> batches of the data contract.

    Args:
        train_shards: brace range (``data/{00000..00009}.tar``), directory, glob, ``pipe:``
            command or http URL; several joined by ``::``.
        val_shards: the same for validation; None disables validation.
        image_size: side of the square output image.
        crop: ``center`` or ``random`` crop after resizing the shorter side.
        hflip: random horizontal flips (off by default: they break "left"/"right" captions).
        batch_size: per-process batch size.
        num_workers: loader processes per rank (each gets a disjoint part of the shards).
        train_batches_per_epoch: batches each rank yields per training epoch.
        val_samples: size of the fixed validation set (split evenly across ranks).
        seed: base seed of shard order, caption choice, shuffling, crops and flips (each rank and
            worker draws its own stream from it); None: the run's seed (``--seed_everything``).
        max_pixels: images with more pixels are skipped (decompression bombs).
        predict_prompts: prompts for ``predict``: a list, a text file (one a line) or one prompt.
        predict_seeds: each prompt is generated once per seed.
        tokens_shape: read pre-computed image tokens of this shape (e.g. ``[8, 8]``) from each
            sample's ``tokens.npy`` member into ``batch["tokens"]`` (``scripts/tokenize_shards.py``);
            a sample without them, or with another shape or dtype, is skipped and counted. The
            tokens belong to the centre crop: ``crop: random`` and ``hflip`` are refused.
        clip_embed_dim: read pre-computed CLIP image embeddings of this size from each sample's
            ``clip.npy`` member into ``batch["clip_image_embed"]`` (``scripts/embed_shards.py``;
            the unCLIP prior and decoder then run no image tower); skipped and counted like tokens,
            and also of the centre crop.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        image_size: int = 64,
        crop: Literal["center", "random"] = "center",
        hflip: bool = False,
        batch_size: int = 32,
        num_workers: int = 2,
        train_batches_per_epoch: int = 1000,
        val_samples: int = 256,
        shuffle_buffer: int = 512,
        seed: int | None = None,
        max_pixels: int = 16_000_000,
        predict_prompts: str | list[str] | None = None,
        predict_seeds: list[int] | None = None,
        tokens_shape: list[int] | None = None,
        clip_embed_dim: int | None = None,
    ):
        super().__init__()
        for option, value, what in (("tokens_shape", tokens_shape, "tokens"),
                                    ("clip_embed_dim", clip_embed_dim, "CLIP embeddings")):  # fmt: skip
            if value is not None and (crop != "center" or hflip):
                raise ValueError(
                    f"pre-computed {what} (data.init_args.{option}) encode the centre crop of each image: "
                    f"set crop: center and hflip: false, or drop {option} to encode every batch on the fly"
                )
        self.tokens_shape, self.clip_embed_dim = tokens_shape, clip_embed_dim
        self.train_shards, self.val_shards = train_shards, val_shards
        self.image_size, self.crop, self.hflip = image_size, crop, hflip
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_batches_per_epoch, self.val_samples = train_batches_per_epoch, val_samples
        self.shuffle_buffer, self.seed, self.max_pixels = shuffle_buffer, seed, max_pixels
        self.predict_prompts, self.predict_seeds = predict_prompts, predict_seeds or [0]
        self._skips: dict[str, dict[str, int]] = {}  # the latest report of each worker, by "<split>/<slot>"
        self._skips_before: dict[str, int] = {}  # training skips of the run before it was resumed
        self._train_loader = None

    # -- distributed context, read from the trainer rather than environment variables
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _urls(self, spec, what: str) -> list[str]:
        urls = expand_urls(spec)
        if not urls:
            raise FileNotFoundError(
                f"data.{what}={spec!r} matches no shard; give a folder of .tar shards, a glob "
                f"(data/mine/*.tar) or a brace range (data/mine/shard-{{00000..00009}}.tar)"
            )
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.exists(u)]
        if missing and len(missing) == len(urls):
            folder = os.path.dirname(missing[0]) or "."
            found = sorted(glob.glob(os.path.join(folder, "*.tar")))
            hint = (f"; {folder} holds {len(found)} shard(s) such as {os.path.basename(found[0])}: "
                    f"pass the folder, --data.init_args.{what} {folder}") if found else ""  # fmt: skip
            raise FileNotFoundError(
                f"data.{what}: none of the {len(urls)} shard(s) exist, e.g. {missing[0]}{hint}"
            )
        return urls

    def check_sources(self, stage: str = "fit") -> None:
        """Fail now, with the fix in the message, if the shards that ``stage`` reads do not exist."""
        if stage == "fit" and self.train_shards is not None:
            self._urls(self.train_shards, "train_shards")
        if stage in ("fit", "validate") and self.val_shards is not None:
            self._urls(self.val_shards, "val_shards")

    def setup(self, stage: str | None = None) -> None:
        rank, world = self._rank_world()
        seed = self.seed if self.seed is not None else run_seed()
        if stage in (None, "fit") and self.train_shards is not None:
            urls = self._urls(self.train_shards, "train_shards")
            slots = world * max(self.num_workers, 1)
            if len(urls) < slots:
                rank_zero_warn(
                    f"{len(urls)} training shard(s) for {world} rank(s) x {max(self.num_workers, 1)} worker(s): "
                    "the workers that share a shard each read all of it and decode every k-th sample "
                    "(every sample still once per pass, at k times the reading). Write more, smaller shards "
                    "(at least one per rank and worker) to read each file once."
                )
            self.train_stream = ShardStream(
                urls, build_transform(self.image_size, self.crop, self.hflip), "train", rank, world,
                seed, shuffle_buffer=self.shuffle_buffer, max_pixels=self.max_pixels, image_size=self.image_size,
                tokens_shape=self.tokens_shape, clip_embed_dim=self.clip_embed_dim,
            )  # fmt: skip
        if stage in (None, "fit", "validate", "test") and self.val_shards is not None:
            self.val_stream = ShardStream(
                self._urls(self.val_shards, "val_shards"), build_transform(self.image_size, "center", False), "val",
                rank, world, seed, val_samples=self.val_samples, max_pixels=self.max_pixels,
                image_size=self.image_size, tokens_shape=self.tokens_shape, clip_embed_dim=self.clip_embed_dim,
            )  # fmt: skip

    def _loader(self, stream: ShardStream, persistent: bool) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=persistent and self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_ignore_ctrl_c if self.num_workers > 0 else None,
        )

    def train_dataloader(self):
        if self._train_loader is None:

            def restart():  # a resumed run starts a stream of its own rather than replaying the first one
                trainer = getattr(self, "trainer", None)
                self.train_stream.start_step = trainer.global_step if trainer is not None else 0

            self._train_loader = FixedLengthLoader(
                self._loader(self.train_stream, persistent=False), self.train_batches_per_epoch, restart
            )
        return self._train_loader

    def val_dataloader(self):
        if self.val_shards is None:
            return []
        return self._loader(self.val_stream, persistent=False)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        prompts = load_prompts(self.predict_prompts)
        if not prompts:
            raise ValueError(
                "predict needs prompts: pass --data.init_args.predict_prompts with a prompt, a list or a text file"
            )
        items = [
            {"caption": p, "seed": s, "index": i} for i, p in enumerate(prompts) for s in self.predict_seeds
        ]
        return DataLoader(items, batch_size=self.batch_size, collate_fn=_prompt_collate)

    # -- skipped-sample accounting
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and SKIPS_KEY in batch:
            worker, counts = batch.pop(SKIPS_KEY)
            self._skips[worker] = counts
        return batch

    @staticmethod
    def _sum_reports(reports: dict[str, dict[str, int]], split: str, total: dict[str, int]) -> dict[str, int]:
        """``total`` plus the counts of the workers' reports (``"<split>/<slot>" -> counts``) of ``split``."""
        total = dict(total)
        for worker, counts in reports.items():
            if worker.startswith(split + "/"):
                for reason, n in counts.items():
                    total[reason] = total.get(reason, 0) + n
        return total

    def skipped(self, split: str = "train") -> dict[str, int]:
        """Samples skipped on this rank, by reason: for training, since the run began (a resumed
        run adds to the counts saved in its checkpoint); for validation, in the latest pass."""
        return self._sum_reports(self._skips, split, self._skips_before if split == "train" else {})

    def state_dict(self) -> dict:
        """The training skip counts of every rank: summed (``skipped_train``) and per rank
        (``skipped_train_by_rank``). Called on every rank when a checkpoint is saved (Lightning
        saves on all ranks together), so the ranks' counts are gathered here."""
        local = self.skipped("train")
        by_rank = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            by_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(by_rank, local)
        total: dict[str, int] = {}
        for counts in by_rank:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return {"skipped_train": total, "skipped_train_by_rank": by_rank}

    def load_state_dict(self, state: dict) -> None:
        """Restore the training skip counts, so ``data/skipped/*`` keeps counting after a resume:
        each rank takes its own share when the world size is the same, else rank zero takes the
        total; the counts saved next are then again the sum over every rank since the run began."""
        self._skips = {}
        rank, world = self._rank_world()
        by_rank = state.get("skipped_train_by_rank")
        if isinstance(by_rank, list) and len(by_rank) == world:
            before = by_rank[rank]
        else:
            before = state.get("skipped_train")
            if before is None:  # checkpoints of earlier versions kept each worker's latest report
                before = self._sum_reports(state.get("skipped", {}), "train", {})
            before = before if rank == 0 else {}
        self._skips_before = {str(k): int(v) for k, v in before.items()}
