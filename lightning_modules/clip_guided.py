"""Methods that use a trained CLIP at sampling time: reranking any other method's samples
(DALL-E) and steering a generator's latent by gradient: a VQGAN's (VQGAN+CLIP) or a trained
GAN's (CLIP + GAN, as BigSleep and FuseDream), one guidance loop (``CLIPGuidance``) for both.
None is trained: all are used through ``predict``, evaluation and ``generate``. Their CLIP and
generator are loaded frozen from checkpoint paths and stay out of their own checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from networks.errors import ConfigError
from networks.frozen import keep_out_of_checkpoints
from networks.noise import stream_seed

from .autoencoder import FrozenAutoencoderUser
from .base import TextToImageModule, load_method
from .clip import load_clip


def per_prompt_seeds(seed: int | list[int] | None, n: int) -> list[int]:
    """One seed per prompt: a list as it is, an int spread over the prompts, None drawn from the
    global RNG (so a seeded run repeats)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"{len(seed)} seeds for {n} prompts")
        return [int(s) for s in seed]
    if seed is None:
        return torch.randint(0, 2**62, (n,)).tolist()
    return [stream_seed(int(seed), "prompt", i) for i in range(n)]


class CLIPScorer:
    """Mixin: a frozen CLIP from ``path`` (``self.clip``) and the cosine similarity of images and
    their prompts under it (``encode_image`` resizes images to the CLIP's input size)."""

    def attach_clip(self, path: str, option: str = "model.init_args.clip"):
        self.clip = keep_out_of_checkpoints(load_clip(path, option=option))
        return self.clip

    @torch.no_grad()
    def clip_similarity(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``(b,)``: cosine similarity of image ``i`` and prompt ``i``."""
        return (self.clip.encode_image(images) * self.clip.encode_text(prompts)).sum(-1)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in ("clip", "method"):
            if getattr(self, name, None) is not None:
                getattr(self, name).eval()  # frozen
        return self


class CLIPRerank(CLIPScorer, TextToImageModule):
    """Best of N: generate ``candidates`` samples per prompt with another method, return the one
    its CLIP finds most similar to the prompt (DALL-E's reranking).

    Args:
        generator: checkpoint of any text-to-image method (its class is read from the checkpoint).
        clip: checkpoint of a CLIP (``configs/clip/``).
        candidates: N, samples per prompt.
        batch_size: images per call of the generator; candidates of several prompts share a call.
        sampling: ``generate`` options of the generator (e.g. ``{steps: 20}``).

    Candidate ``j`` of a prompt with seed ``s`` is the generator's sample for seed ``s`` when
    ``j = 0`` and for ``stream_seed(s, "candidate", j)`` otherwise, so N = 1 is the generator
    itself and a prompt's candidates do not depend on the batch it is in. :meth:`rank` returns
    every candidate with its score.
    """

    def __init__(
        self,
        generator: str,
        clip: str,
        candidates: int = 16,
        batch_size: int = 64,
        sampling: dict | None = None,
        return_all: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if candidates < 1 or batch_size < 1:
            raise ConfigError("model.init_args.candidates and batch_size must be at least 1")
        self.method = keep_out_of_checkpoints(load_method(generator, option="model.init_args.generator"))
        self.attach_clip(clip)
        self.candidates, self.batch_size, self.return_all = candidates, batch_size, return_all
        self.sampling = dict(sampling or {})
        self.method.check_sampling(self.sampling)

    @property
    def image_size(self) -> int | None:
        return getattr(self.method, "image_size", None)

    def sampling_options(self) -> tuple[str, ...]:
        return ("candidates", *self.method.sampling_options())

    @torch.no_grad()
    def rank(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        candidates: int | None = None,
        **sampling,
    ) -> tuple[Tensor, Tensor]:
        """Every candidate and its CLIP similarity: ``(b, n, 3, h, w)`` and ``(b, n)``."""
        self.check_sampling(sampling)
        n, options = candidates or self.candidates, {**self.sampling, **sampling}
        seeds = per_prompt_seeds(seed, len(prompts))
        flat = [
            (p, s if j == 0 else stream_seed(s, "candidate", j))
            for p, s in zip(prompts, seeds)
            for j in range(n)
        ]
        images, scores = [], []
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start : start + self.batch_size]
            texts = [p for p, _ in chunk]
            x = self.method.generate(texts, seed=[s for _, s in chunk], **options)
            images.append(x)
            scores.append(self.clip_similarity(x, texts))
        images, scores = torch.cat(images), torch.cat(scores)
        return images.view(len(prompts), n, *images.shape[1:]), scores.view(len(prompts), n)

    def generate(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        candidates: int | None = None,
        **sampling,
    ) -> Tensor:
        if (candidates or self.candidates) == 1 and not isinstance(seed, (list, tuple)):
            self.check_sampling(sampling)  # N = 1 with one stream: the generator's own call
            return self.method.generate(list(prompts), seed=seed, **{**self.sampling, **sampling})
        images, scores = self.rank(list(prompts), seed=seed, candidates=candidates, **sampling)
        return images[torch.arange(len(prompts)), scores.argmax(1)]

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """The best candidate as ``image``; with ``return_all``, also every candidate and score."""
        if not self.return_all:
            return super().predict_step(batch, batch_idx)
        images, scores = self.rank(list(batch["caption"]), seed=[int(s) for s in batch["seed"]])
        best = images[torch.arange(len(images)), scores.argmax(1)]
        return {**batch, "image": best, "candidates": images, "scores": scores}


def colour_jitter(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation each scaled by a factor drawn from
    ``[1 - strength, 1 + strength]``, on an image in [0, 1] ``(3, h, w)``; the result is clamped
    to [0, 1] in the forward pass only, so every pixel keeps its gradient (torchvision's
    ``ColorJitter`` clamps with a zero gradient outside the range)."""
    b, c, s = (1 + strength * (2 * torch.rand(3, generator=generator) - 1)).tolist()
    x = image * b
    x = (x - _grey(x).mean()) * c + _grey(x).mean()
    x = (x - _grey(x)) * s + _grey(x)
    return x + (x.clamp(0, 1) - x).detach()


def _grey(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, as torchvision's ``rgb_to_grayscale``, ``(1, h, w)``."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def border_colour(image: Tensor) -> list[float]:
    """The median colour of an image's outermost pixels (its background, for a scene on a plain
    ground): what the affine map fills the corners it uncovers with."""
    edge = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)  # (3, 4 side)
    return edge.detach().median(dim=1).values.tolist()


def spherical_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared great-circle distance of unit vectors (the VQGAN+CLIP notebooks' loss)."""
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


class CLIPGuidance(CLIPScorer, TextToImageModule):
    """CLIP guidance of a frozen generator's latent: Adam on one latent per prompt so that random
    cutouts of its decoded image move towards the prompt under CLIP. A subclass says what the
    latent is: :meth:`_initial` (the start, drawn from each prompt's own generator), :meth:`_decode`
    (latent -> images in [-1, 1], differentiable) and :meth:`_project` (after every step, e.g. a
    clamp to the latent's range).

    Each step scores ``cutouts`` random crops of the image (side between ``cut_min`` of it and all
    of it, resized to the CLIP's input) after a small random affine map (torchvision v2, uncovered
    corners filled with the image's border colour) and colour jitter, both on the image mapped to
    [0, 1] and back, with the spherical-distance loss.

    Args:
        clip: checkpoint of a CLIP (never the table's judge).
        steps, lr: Adam steps and learning rate.
        cutouts, cut_min: crops per step and their smallest side, as a fraction of the image.
        affine_degrees, affine_translate, jitter: strength of the augmentations (0 turns one off).
        cut_noise: Gaussian noise added to each cutout, times a random factor in [0, 1) (the
            notebooks' ``noise_fac``); 0 turns it off.

    Seeded per prompt: the initial latent and every cutout of a prompt come from its own seed, so
    its image does not depend on the batch. ``last_loss_curve`` holds the CLIP loss of every
    step and prompt of the latest ``generate`` call, ``(steps, b)``.
    """

    def init_guidance(self, clip: str, steps: int, lr: float, cutouts: int, cut_min: float, affine_degrees: float,
                      affine_translate: float, jitter: float, cut_noise: float) -> None:  # fmt: skip
        """The loop's options (called by the subclass's ``__init__``)."""
        self.attach_clip(clip)
        if not 0 < cut_min <= 1:
            raise ConfigError(f"model.init_args.cut_min must be in (0, 1], got {cut_min}")
        if cutouts < 1 or steps < 0:
            raise ConfigError(f"model.init_args.cutouts must be at least 1 and steps at least 0, got {cutouts}, {steps}")
        self.steps, self.lr, self.cutouts, self.cut_min = steps, lr, cutouts, cut_min
        self.affine_degrees, self.affine_translate, self.jitter = affine_degrees, affine_translate, jitter
        self.cut_noise = cut_noise
        self.last_loss_curve: Tensor | None = None

    # ------------------------------------------------------------------ what a subclass defines
    def _initial(self, prompts: list[str], gens: list[torch.Generator]) -> Tensor:
        """The latents to start from, one per prompt (drawn from ``gens``, one per prompt)."""
        raise NotImplementedError

    def _decode(self, latent: Tensor) -> Tensor:
        """Latents -> images in [-1, 1], differentiable."""
        raise NotImplementedError

    def _project(self, latent: Tensor) -> None:
        """In place, after every step (no gradient): keep the latent where the generator was trained."""

    # ------------------------------------------------------------------ the loop
    def _cutouts(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """``cutouts`` random crops of one image ``(3, h, w)``, augmented, at the CLIP's size."""
        size, side = self.clip.image_size or image.shape[-1], image.shape[-1]
        out = []
        for _ in range(self.cutouts):
            u = torch.rand(3, generator=generator).tolist()
            crop = int(round(side * (self.cut_min + (1 - self.cut_min) * u[0])))
            top, left = int(u[1] * (side - crop + 1)), int(u[2] * (side - crop + 1))
            cut = v2.functional.resized_crop(image, top, left, crop, crop, [size, size], antialias=True)
            cut = self.augment((cut + 1) / 2, generator) * 2 - 1  # torchvision's colour ops want [0, 1]
            if self.cut_noise:
                scale = self.cut_noise * float(torch.rand(1, generator=generator))
                cut = cut + scale * torch.randn(cut.shape, generator=generator).to(cut.device)
            out.append(cut)
        return torch.stack(out)

    def augment(self, cut: Tensor, generator: torch.Generator) -> Tensor:
        """The random affine map and colour jitter of one cutout ``(3, s, s)`` in [0, 1]."""
        if self.affine_degrees or self.affine_translate:
            t = self.affine_translate
            affine = v2.RandomAffine(degrees=self.affine_degrees, translate=(t, t), fill=border_colour(cut))
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                cut = affine(cut)
        if self.jitter:
            cut = colour_jitter(cut, self.jitter, generator)
        return cut

    def generate(
        self,
        prompts: list[str],
        *,
        seed: int | list[int] | None = None,
        steps: int | None = None,
        lr: float | None = None,
        **unknown,
    ) -> Tensor:
        self.check_sampling(unknown)
        # predict and evaluation run under inference mode, where no gradient can be taken
        with torch.inference_mode(False), torch.enable_grad():
            return self._optimise(list(prompts), seed, self.steps if steps is None else steps, lr or self.lr)

    def _optimise(self, prompts: list[str], seed, steps: int, lr: float) -> Tensor:
        seeds = per_prompt_seeds(seed, len(prompts))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        latent = self._initial(prompts, gens).detach().requires_grad_(True)
        with torch.no_grad():
            target = self.clip.encode_text(prompts)  # (b, d)
        opt = torch.optim.Adam([latent], lr=lr)
        curve = []
        for _ in range(steps):
            images = self._decode(latent)
            cuts = torch.stack([self._cutouts(img, g) for img, g in zip(images, gens)])  # (b, n, 3, s, s)
            features = self.clip.encode_image(cuts.flatten(0, 1)).view(len(prompts), self.cutouts, -1)
            loss = spherical_distance(features, target[:, None]).mean(1)  # (b,)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # each prompt's latent sees only its own loss
            opt.step()
            with torch.no_grad():
                self._project(latent)
            curve.append(loss.detach())
        self.last_loss_curve = torch.stack(curve) if curve else None
        with torch.no_grad():
            return self._decode(latent).clamp(-1, 1)


class VQGANCLIP(FrozenAutoencoderUser, CLIPGuidance):
    """VQGAN+CLIP: :class:`CLIPGuidance` of a VQGAN's latent. The latent lives in the quantiser's
    lookup space, starts from random codes (or a flat colour), goes through the quantiser
    straight-through (forward: the nearest code; backward: identity) and is clamped to the
    codebook's range after every step.

    Args:
        autoencoder: checkpoint of a VQ autoencoder (VQGAN or VQ-VAE).
        clip, steps, lr, cutouts, cut_min, affine_degrees, affine_translate, jitter, cut_noise:
            the guidance loop's (:class:`CLIPGuidance`).
        init_colour: start from the codes of a flat image of this RGB colour in [-1, 1] (e.g. the
            data's background) plus ``init_noise`` times the codebook's spread; None: random codes
            everywhere (the notebooks' default), which leaves clutter that CLIP does not penalise.
        init_noise: see ``init_colour``.
    """

    def __init__(
        self,
        autoencoder: str,
        clip: str,
        steps: int = 100,
        lr: float = 0.1,
        cutouts: int = 16,
        cut_min: float = 0.6,
        affine_degrees: float = 5.0,
        affine_translate: float = 0.05,
        jitter: float = 0.05,
        cut_noise: float = 0.0,
        init_colour: list[float] | None = None,
        init_noise: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        vq = self.attach_autoencoder(autoencoder, vq=True)
        self.init_guidance(clip, steps, lr, cutouts, cut_min, affine_degrees, affine_translate, jitter, cut_noise)
        self.side = vq.image_size // vq.downsample_factor
        self.init_colour, self.init_noise = init_colour, init_noise
        if init_colour is not None and len(init_colour) != 3:
            raise ConfigError(
                f"model.init_args.init_colour must be three values in [-1, 1] (RGB), got {init_colour}"
            )

    @property
    def image_size(self) -> int:
        return self.autoencoder.image_size

    def _decode(self, z: Tensor) -> Tensor:
        """Lookup-space latents ``(b, h, w, d)`` -> images, through the straight-through quantiser."""
        q = self.autoencoder.quantizer
        codes = q.codes()
        flat = z.reshape(-1, z.shape[-1])
        z_q = flat + (codes[q.nearest(flat.detach())] - flat).detach()
        latents = q.project_out(z_q).view(*z.shape[:3], q.dim).permute(0, 3, 1, 2)
        x = self.autoencoder.decoder(latents)
        return x + (x.clamp(-1, 1) - x).detach()  # clamped forward, gradient passes (clamp_with_grad)

    def _project(self, z: Tensor) -> None:
        codes = self.autoencoder.quantizer.codes()
        z.copy_(torch.maximum(torch.minimum(z, codes.max(0).values), codes.min(0).values))

    def _initial(self, prompts: list[str], gens: list[torch.Generator]) -> Tensor:
        """Lookup-space latents to start from, ``(b, h, w, d)``, one generator per prompt."""
        codes = self.autoencoder.quantizer.codes().detach()
        shape = (self.side, self.side)
        if self.init_colour is None:
            init = torch.stack([torch.randint(0, len(codes), shape, generator=g) for g in gens])
            return codes[init.to(codes.device)].clone()
        q, size = self.autoencoder.quantizer, self.autoencoder.image_size
        flat = torch.tensor(self.init_colour, device=codes.device, dtype=torch.float32).view(1, 3, 1, 1)
        with torch.no_grad():
            z = q.project_in(self.autoencoder.encoder(flat.expand(1, 3, size, size)).permute(0, 2, 3, 1))
        base = codes[q.nearest(z.reshape(-1, z.shape[-1]))].view(1, *shape, -1)
        noise = torch.stack([torch.randn(*shape, codes.shape[1], generator=g) for g in gens]).to(codes.device)
        return base + self.init_noise * codes.std(0) * noise


class GANCLIP(CLIPGuidance):
    """CLIP + GAN (BigSleep, FuseDream): :class:`CLIPGuidance` of a trained text-conditional GAN's
    latent. For a generator with a mapping network (``networks.stylegan.StyleGenerator``) the
    latent is ``w``, started at ``mapping(z, prompt)``; for any other (the StackGANs, AttnGAN) it is
    ``z``, started at a draw of N(0, I). The rest of the generator's input stays as the prompt and
    its seed make it: the caption's encoding (the EMA generator's), the conditioning code, the
    per-pixel noise and hierarchical chunks are drawn afresh from the prompt's own seed at every
    step, so only the latent moves.

    Args:
        generator: checkpoint of a ``TextToImageGAN`` (its EMA generator is used).
        latent: ``w`` or ``z``; None: ``w`` where the generator has a mapping network, else ``z``.
        clip, steps, lr, cutouts, cut_min, affine_degrees, affine_translate, jitter, cut_noise:
            the guidance loop's (:class:`CLIPGuidance`).
    """

    def __init__(
        self,
        generator: str,
        clip: str,
        latent: str | None = None,
        steps: int = 50,
        lr: float = 0.05,
        cutouts: int = 16,
        cut_min: float = 0.6,
        affine_degrees: float = 5.0,
        affine_translate: float = 0.05,
        jitter: float = 0.05,
        cut_noise: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        from .gan import StackGANStageII, TextToImageGAN

        self.method = keep_out_of_checkpoints(load_method(generator, option="model.init_args.generator"))
        if not isinstance(self.method, TextToImageGAN) or isinstance(self.method, StackGANStageII):
            raise ConfigError(f"model.init_args.generator: {generator!r} is a {type(self.method).__name__}, "
                              "not a one-stage GAN's checkpoint (TextToImageGAN, AttnGAN; for StackGAN stage II, "
                              "whose latent is its stage I's, guide the stage-I checkpoint)")  # fmt: skip
        has_w = hasattr(self.method.ema_generator, "mapping")
        self.latent = latent or ("w" if has_w else "z")
        if self.latent not in ("w", "z") or (self.latent == "w" and not has_w):
            raise ConfigError(f"model.init_args.latent: {latent!r}: 'z', or 'w' for a generator with a mapping network "
                              f"({type(self.method.ema_generator).__name__} {'has' if has_w else 'has none'})")  # fmt: skip
        self.init_guidance(clip, steps, lr, cutouts, cut_min, affine_degrees, affine_translate, jitter, cut_noise)
        self._fixed: dict = {}

    @property
    def image_size(self) -> int:
        return self.method.image_size

    def _noise(self) -> list[torch.Generator]:
        """The prompts' noise generators, the same at every step."""
        return [torch.Generator(self.device).manual_seed(s) for s in self._fixed["seeds"]]

    def _initial(self, prompts: list[str], gens: list[torch.Generator]) -> Tensor:
        encoding = self.method.encode(prompts, ema=True)
        seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in gens]
        z = torch.stack([torch.randn(self.method.ema_generator.z_dim, generator=g) for g in gens]).to(self.device)
        self._fixed = {"encoding": encoding, "seeds": seeds, "z": z}
        if self.latent == "z":
            return z.clone()
        net = self.method.ema_generator
        return net.mapping(z[:, : net.mapping.z_dim], encoding.pooled)

    def _decode(self, latent: Tensor) -> Tensor:
        encoding = self._fixed["encoding"]
        if self.latent == "z":
            out = self.method.run_generator(encoding.pooled, ema=True, generator=self._noise(), context=encoding, z=latent)
        else:
            out = self.method.run_generator(encoding.pooled, ema=True, generator=self._noise(), context=encoding,
                                            z=self._fixed["z"], w=latent)  # fmt: skip
        return out.images[-1]
