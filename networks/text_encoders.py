"""Text encoders: captions in, ``TextEncoding`` (tokens, mask, pooled) out.

Every encoder is an ``nn.Module`` whose ``forward(captions: list[str])`` returns
``TextEncoding(tokens=(b, n, d), mask=(b, n) bool with True on real tokens, pooled=(b, d))``
and whose ``dim`` attribute is ``d``. Two kinds:

- ``TransformerTextEncoder``: trained from scratch, with a tokenizer that ships inside an
  installed package (open_clip's bundled BPE vocabulary) or plain UTF-8 bytes;
- ``PretrainedTextEncoder``: a frozen Hugging Face encoder (T5, CLIP text, BERT-like)
  loaded from a local directory, never downloaded.

Tokenizer libraries are imported lazily inside the constructors so that this package keeps
to torch and einops at import time.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frozen import keep_out_of_checkpoints


class TextEncoding(NamedTuple):
    tokens: Tensor  # (b, n, d)
    mask: Tensor  # (b, n) bool, True where a real token is
    pooled: Tensor  # (b, d)


def warn_truncated(owner: object, captions: list[str], lengths: list[int], limit: int) -> None:
    """Warn, once per ``owner`` (a tokenizer or an encoder), when captions have more tokens than
    the text tower's context; they are truncated, never a crash."""
    long = [c for c, n in zip(captions, lengths) if n > limit]
    if long and not getattr(owner, "_warned_truncation", False):
        owner._warned_truncation = True
        warnings.warn(
            f"{len(long)} caption(s) longer than the text tower's {limit} tokens were truncated "
            f"(first: {long[0][:60]!r}...); raise the tower's context length (max_length) to keep them whole",
            stacklevel=3,
        )


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 pad, 1 start, 2 end, byte value + 3."""

    vocab_size = 259

    def __call__(self, texts: list[str], max_length: int) -> Tensor:
        out = torch.zeros(len(texts), max_length, dtype=torch.long)
        warn_truncated(self, texts, [len(t.encode("utf-8")) + 2 for t in texts], max_length)
        for i, text in enumerate(texts):
            ids = [1] + [b + 3 for b in text.encode("utf-8")][: max_length - 2] + [2]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Tensor) -> str:
        """One row of ``__call__``'s output back to text (start, end and padding dropped)."""
        return bytes(int(i) - 3 for i in ids.tolist() if i >= 3).decode("utf-8", errors="replace")


class BPETokenizer:
    """open_clip's bundled BPE vocabulary (49,408 tokens), read from the installed package."""

    def __init__(self):
        from open_clip.tokenizer import SimpleTokenizer  # ships its vocabulary file, no download

        self.tok = SimpleTokenizer()
        self.vocab_size = len(self.tok.encoder)
        self.sot, self.eot = self.tok.all_special_ids[:2]

    def __call__(self, texts: list[str], max_length: int) -> Tensor:
        out = torch.zeros(len(texts), max_length, dtype=torch.long)
        encoded = [self.tok.encode(text) for text in texts]
        warn_truncated(self, texts, [len(e) + 2 for e in encoded], max_length)
        for i, e in enumerate(encoded):
            ids = [self.sot] + e[: max_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Tensor) -> str:
        """One row of ``__call__``'s output back to text (start, end and padding dropped). The BPE
        lower-cases and normalises whitespace (it puts a space before punctuation), so compare
        with ``same_text``."""
        return self.tok.decode([int(i) for i in ids.tolist() if int(i) not in (0, self.sot, self.eot)])


_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def same_text(a: str, b: str) -> bool:
    """Equal up to case, whitespace and typographic quotes (open_clip's BPE writes ’ as '): what a
    tokenizer round trip may change without loss."""
    return "".join(a.lower().translate(_QUOTES).split()) == "".join(b.lower().translate(_QUOTES).split())


def roundtrip_problems(tokenizer, texts: list[str], max_length: int, name: str = "") -> list[str]:
    """Each text that ``tokenizer`` does not give back (decoded, ``same_text``) within ``max_length``
    tokens, named with the tokenizer and what came back: truncation and unknown characters are
    losses. Empty when every text survives."""
    ids = tokenizer(texts, max_length)
    out = []
    for text, row in zip(texts, ids):
        back = tokenizer.decode(row)
        if not same_text(back, text):
            out.append(f"the {name or type(tokenizer).__name__} tokenizer does not keep {text!r} in {max_length} tokens "
                       f"(it gives back {back!r}): raise max_length, or use a tokenizer that covers the script")  # fmt: skip
    return out


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP block over (b, n, d) with a key padding mask (b, n)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :]
        )  # (b, heads, n, d/heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TransformerTextEncoder(nn.Module):
    """A small transformer text encoder trained with the method.

    Args:
        width: token embedding size ``d``.
        depth: transformer blocks.
        heads: attention heads.
        max_length: tokens kept per caption, start and end tokens included.
        tokenizer: ``bpe`` (open_clip's bundled vocabulary) or ``byte`` (UTF-8 bytes).
    """

    def __init__(
        self,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        max_length: int = 32,
        tokenizer: Literal["bpe", "byte"] = "bpe",
    ):
        super().__init__()
        self.tokenizer = BPETokenizer() if tokenizer == "bpe" else ByteTokenizer()
        self.dim, self.max_length = width, max_length
        self.embed = nn.Embedding(self.tokenizer.vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_length, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, captions: list[str]) -> TextEncoding:
        ids = self.tokenizer(list(captions), self.max_length).to(self.pos.device)  # (b, n)
        mask = ids != 0
        x = self.embed(ids) + self.pos  # (b, n, d)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (b, d) mean over real tokens
        return TextEncoding(x, mask, pooled)


class PretrainedTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder read from a local directory (Imagen-style conditioning).

    Its weights stay out of checkpoints: a method's checkpoint stores the path (in its
    hyperparameters) and the encoder is read from there again when the method is loaded.

    Args:
        path: directory holding the model's config, weights and tokenizer files
            (``save_pretrained`` output). Nothing is downloaded.
        max_length: tokens kept per caption.
        pooling: ``mean`` of real tokens, ``first`` token, or the model's own ``pooler_output``.
    """

    def __init__(self, path: str, max_length: int = 77, pooling: Literal["mean", "first", "model"] = "mean"):
        super().__init__()
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(
                f"text encoder path {path!r} is not a directory. Set "
                "model.init_args.text_encoder.init_args.path to a local folder made with "
                "`save_pretrained` (T5, CLIP text or BERT-like); weights are never downloaded."
            )
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if config.model_type in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel

            model = T5EncoderModel.from_pretrained(path, local_files_only=True)
        elif config.model_type == "clip":
            from transformers import CLIPTextModel

            model = CLIPTextModel.from_pretrained(path, local_files_only=True)
        else:
            model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model = model.eval().requires_grad_(False)
        self.dim = getattr(config, "hidden_size", None) or config.d_model
        self.max_length, self.pooling = max_length, pooling
        keep_out_of_checkpoints(self)

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off
        return self

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextEncoding:
        captions = list(captions)
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False)["input_ids"]]
        warn_truncated(self, captions, lengths, self.max_length)
        enc = self.tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = out.last_hidden_state  # (b, n, d)
        if self.pooling == "model" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output
        elif self.pooling == "first":
            pooled = tokens[:, 0]
        else:
            pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextEncoding(tokens.float(), mask, pooled.float())
