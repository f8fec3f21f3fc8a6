"""AttnGAN (Xu et al., 2018): the Deep Attentional Multimodal Similarity Model (DAMSM) and the
attentional generator.

DAMSM scores an image against a caption at two levels. Its image encoder gives region features
(a grid of local vectors) and a global vector; its text encoder gives word vectors and a sentence
vector, all in one space of size ``dim``.

- Word level (eq. 7 to 11 of the paper): each word attends over the image's regions,
  ``s = e^T v``, normalised over the words (``softmax`` over words for every region), then
  ``alpha = softmax_regions(gamma1 * s_norm)``; the word's region context is
  ``c = sum alpha v``; ``R(c, e) = cos(c, e)``; the pair's score is
  ``R(Q, D) = log(sum_words exp(gamma2 R(c, e))) / gamma2`` (the paper's eq. 10; the released
  code leaves out the ``1 / gamma2``).
- Sentence level: ``R(Q, D) = cos(global image vector, sentence vector)``.

Each level's loss is the cross-entropy of ``softmax(gamma3 R)`` over the batch in both directions
(a caption picks its image among the batch's images and an image its caption). Pairs of a batch
whose caption is also true of the other image are masked out as negatives (``same``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .noise import Generators
from .stackgan import (
    ConditioningAugmentation,
    GeneratorOutput,
    ResBlock,
    UpBlock,
    _log2_steps,
    _Stem,
    _to_rgb,
    tree_widths,
)
from .text_encoders import TextEncoding

# ----------------------------------------------------------------------------- DAMSM's scores and loss


def word_scores(words: Tensor, mask: Tensor | None, regions: Tensor, gamma1: float, gamma2: float) -> Tensor:
    """``R(Q_j, D_i)`` at the word level for every image ``i`` and caption ``j``: (images, captions).
    ``words`` (c, T, d) and ``mask`` (c, T, true for real words) of the captions; ``regions``
    (i, N, d). Every pair at once, (i, c, T, N), without copies of the words or regions."""
    s = torch.einsum("jtd,ind->ijtn", words, regions)  # s = e^T v for every pair
    if mask is not None:
        s = s.masked_fill(~mask[None, :, :, None], float("-inf"))
    alpha = (gamma1 * s.softmax(dim=2)).softmax(dim=3)  # normalised over the words (eq. 8), then over the regions (eq. 9)
    context = torch.einsum("ijtn,ind->ijtd", alpha, regions)  # each word's region context c
    relevance = F.cosine_similarity(context, words[None].expand_as(context), dim=-1)  # R(c, e): (i, c, T)
    if mask is not None:
        relevance = relevance.masked_fill(~mask[None], float("-inf"))  # padding words count for nothing
    return torch.logsumexp(gamma2 * relevance, dim=2) / gamma2  # eq. 10


def sentence_scores(global_image: Tensor, sentence: Tensor) -> Tensor:
    """Cosine similarity of every image's global vector and every sentence: (images, captions)."""
    return F.normalize(global_image, dim=-1) @ F.normalize(sentence, dim=-1).T


def matching_loss(scores: Tensor, gamma3: float, same: Tensor | None = None) -> Tensor:
    """``-log P(D_i | Q_i) - log P(Q_i | D_i)`` averaged over the batch, from ``scores`` (images,
    captions) with matching pairs on the diagonal; ``same`` (b, b) true where caption ``j`` is also
    true of image ``i``: those off-diagonal pairs are not negatives."""
    logits = gamma3 * scores
    if same is not None:
        off = same & ~torch.eye(len(same), dtype=torch.bool, device=same.device)
        logits = logits.masked_fill(off, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits.T, target) + F.cross_entropy(logits, target)  # images per caption, captions per image


def damsm_loss(
    words: Tensor,
    mask: Tensor | None,
    sentence: Tensor,
    regions: Tensor,
    global_image: Tensor,
    gamma1: float = 4.0,
    gamma2: float = 5.0,
    gamma3: float = 10.0,
    same: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(word loss, sentence loss) of a batch of matching pairs; ``regions`` (b, N, d)."""
    word = matching_loss(word_scores(words, mask, regions, gamma1, gamma2), gamma3, same)
    return word, matching_loss(sentence_scores(global_image, sentence), gamma3, same)


def same_captions(captions: list[str]) -> Tensor:
    """(b, b) true where two captions of a batch are the same text (each is then true of both
    images): what the data says about shared captions when it says nothing else."""
    keys = [" ".join(c.lower().split()) for c in captions]
    return torch.tensor([[a == b for b in keys] for a in keys])


# ----------------------------------------------------------------------------- DAMSM's encoders


class DAMSMImageEncoder(nn.Module):
    """Image -> (region features (b, dim, r, r) at ``image_size / 4``, global vector (b, dim)). The
    paper takes both from an ImageNet Inception-v3 (mixed_6e and the last pool); here a small CNN
    trained with the text encoder on the shards (no download at run time).

    Args:
        image_size: input side (images of another side are resized).
        dim: the shared space's size.
        channels: width of the first convolution, doubled at each of the three downsamplings.
    """

    def __init__(self, image_size: int = 32, dim: int = 128, channels: int = 32):
        super().__init__()
        if image_size < 16 or image_size % 8:
            raise ValueError(f"DAMSM's image encoder needs a side of at least 16 px, a multiple of 8; got {image_size}")
        self.image_size, self.dim = image_size, dim
        c = channels

        def down(a: int, b: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(a, b, 4, stride=2, padding=1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True))

        self.local = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.LeakyReLU(0.2, True), down(c, 2 * c), down(2 * c, 4 * c))
        self.regions = nn.Conv2d(4 * c, dim, 1)
        self.pooled = nn.Sequential(down(4 * c, 8 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * c, dim))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        if image.shape[-1] != self.image_size:
            image = F.interpolate(image, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        h = self.local(image)
        return self.regions(h), self.pooled(h)


class DAMSMTextEncoder(nn.Module):
    """A text encoder of the framework (tokens, mask, pooled) with DAMSM's projections to word and
    sentence vectors of size ``dim``; returns a ``TextEncoding(words, mask, sentence)``, so that it
    serves the AttnGAN as its (frozen) text encoder. The paper uses a bidirectional LSTM."""

    def __init__(self, encoder: nn.Module, dim: int = 128):
        super().__init__()
        width = getattr(encoder, "dim", None)
        if width is None:
            raise ValueError(f"{type(encoder).__name__} has no dim attribute: DAMSM needs the text encoder's width")
        self.encoder, self.dim = encoder, dim
        self.words = nn.Linear(width, dim)
        self.sentence = nn.Linear(width, dim)

    def forward(self, captions: list[str]) -> TextEncoding:
        out = self.encoder(list(captions))
        return TextEncoding(self.words(out.tokens), out.mask, self.sentence(out.pooled))


# ----------------------------------------------------------------------------- the attentional generator


class WordAttention(nn.Module):
    """AttnGAN's attention in the generator (eq. 2): every image position ``h_j`` attends over the
    words, projected to the image's channels (``e' = U e``): ``beta = softmax_words(h_j^T e'_i)``,
    ``c_j = sum beta e'_i``; returns the word-context map (b, channels, h, w)."""

    def __init__(self, channels: int, word_dim: int):
        super().__init__()
        self.project = nn.Linear(word_dim, channels, bias=False)

    def forward(self, h: Tensor, words: Tensor, mask: Tensor | None) -> Tensor:
        b, c, height, width = h.shape
        e = self.project(words)  # (b, T, c)
        scores = h.flatten(2).transpose(1, 2) @ e.transpose(1, 2)  # (b, hw, T)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return (scores.softmax(dim=-1) @ e).transpose(1, 2).reshape(b, c, height, width)


class _AttentionStage(nn.Module):
    """Word attention, the hidden features joined with their word contexts, residual blocks, 2x up."""

    def __init__(self, channels: int, word_dim: int, out_channels: int, num_res_blocks: int):
        super().__init__()
        self.attention = WordAttention(channels, word_dim)
        self.join = nn.Sequential(
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, bias=False), nn.BatchNorm2d(2 * channels), nn.GLU(dim=1)
        )  # fmt: skip
        self.res = nn.Sequential(*[ResBlock(channels) for _ in range(num_res_blocks)])
        self.up = UpBlock(channels, out_channels)

    def forward(self, h: Tensor, words: Tensor, mask: Tensor | None) -> Tensor:
        joined = self.join(torch.cat([h, self.attention(h, words, mask)], dim=1))
        return self.up(self.res(joined))


class AttnGenerator(nn.Module):
    """AttnGAN's generator: StackGAN++'s stem from noise and the conditioning-augmented sentence
    to ``base_size``, then ``num_stages - 1`` attention stages, each attending to the words and
    doubling the side; one image per stage, lowest first.

    Args:
        text_dim: DAMSM's space (word and sentence vectors).
        image_size: the last stage's side.
        num_stages: images drawn (AttnGAN: 3, at 64, 128 and 256 px).
        z_dim, cond_dim, channels, num_res_blocks: as ``networks.stackgan.TreeGenerator``.

    ``forward(z, sentence, generator=rng, tokens=words, mask=mask)``; ``uses_tokens`` tells
    ``TextToImageGAN`` to pass the words.
    """

    uses_tokens = True

    def __init__(self, text_dim: int, image_size: int = 32, num_stages: int = 3, z_dim: int = 100,
                 cond_dim: int = 100, channels: int = 256, num_res_blocks: int = 2):  # fmt: skip
        super().__init__()
        if num_stages < 2:
            raise ValueError(f"num_stages must be at least 2 (a stem and an attention stage), got {num_stages}")
        base = image_size >> (num_stages - 1)
        _log2_steps(base, 4, f"AttnGAN's first stage ({image_size} px over {num_stages} stages)")
        self.z_dim, self.image_size = z_dim, image_size
        self.ca = ConditioningAugmentation(text_dim, cond_dim)
        self.stem = _Stem(z_dim, cond_dim, channels, base)
        width = tree_widths(self.stem.out_channels, num_stages)
        self.stages = nn.ModuleList(
            _AttentionStage(width[i], text_dim, width[i + 1], num_res_blocks) for i in range(num_stages - 1)
        )
        self.to_rgb = nn.ModuleList(_to_rgb(w) for w in width)

    def forward(self, z: Tensor, sentence: Tensor, generator: Generators = None, tokens: Tensor | None = None,
                mask: Tensor | None = None) -> GeneratorOutput:  # fmt: skip
        if tokens is None:
            raise ValueError("AttnGAN's generator attends to the words: pass tokens= (and mask=)")
        c, mu, logvar = self.ca(sentence, generator)
        h = self.stem(z, c)
        images = [self.to_rgb[0](h)]
        for stage, to_rgb in zip(self.stages, self.to_rgb[1:]):
            h = stage(h, tokens, mask)
            images.append(to_rgb(h))
        return GeneratorOutput(images, mu, logvar)
