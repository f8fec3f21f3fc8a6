"""Vector quantization of a latent map against a codebook of ``codebook_size`` codes.

- Straight-through gradients: the decoder's gradient reaches the encoder as if the quantizer
  were the identity.
- Loss ``||sg[z] - e||^2 + beta * ||z - sg[e]||^2`` (van den Oord et al.): ``beta`` weights the
  commitment of the encoder output ``z`` to its code (taming's legacy quantizer puts it on the
  codebook term instead). With EMA codebook updates the first term is replaced by the update.
- EMA updates (decay ~0.99, Laplace-smoothed counts) or gradient updates of the codes.
- Optional l2-normalised (cosine) codes and a low-dimensional lookup (``codebook_dim``) with
  linear projections in and out (ViT-VQGAN, LlamaGen): both keep far more codes in use.
- Dead-code restart: a code whose EMA usage (assignments per batch) falls below
  ``dead_code_threshold`` is re-initialised from an encoder output of the current batch.

Under ``torch.distributed`` the per-batch statistics (counts and sums per code) are all-reduced
and the restart vectors are broadcast from rank zero, so every rank holds the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError


@dataclass
class Quantized:
    latents: Tensor  # (b, dim, h, w) straight-through quantized latents, the decoder's input
    indices: Tensor  # (b, h, w) long
    loss: Tensor  # codebook + beta * commitment (the commitment alone with EMA codes)
    commit_loss: Tensor  # ||z - sg[e]||^2, unweighted
    counts: Tensor  # (codebook_size,) assignments in this batch (summed over ranks in training)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def perplexity(counts: Tensor) -> Tensor:
    """``exp(entropy)`` of the code distribution given by ``counts``: the effective number of codes."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def usage(counts: Tensor) -> Tensor:
    """Fraction of the codes assigned at least once."""
    return (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """Args:
    codebook_size: number of codes K.
    dim: channels of the latent map (the encoder's output and the decoder's input).
    codebook_dim: dimension of the lookup; None: ``dim``. A smaller one projects in and out.
    beta: weight of the commitment term.
    ema: update the codes by exponential moving averages of their assigned vectors instead
        of by gradient.
    decay: EMA decay (of the codes and of the usage counts).
    eps: Laplace smoothing of the EMA counts.
    cosine: l2-normalise the codes and the encoder outputs before the lookup.
    dead_code_threshold: restart codes whose EMA usage (assignments per batch, summed over
        ranks) is below this; 0 disables the restart.
    """

    def __init__(
        self,
        codebook_size: int = 1024,
        dim: int = 64,
        codebook_dim: int | None = None,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        cosine: bool = False,
        dead_code_threshold: float = 0.0,
    ):
        super().__init__()
        codebook_dim = codebook_dim or dim
        if codebook_dim > dim:
            raise ConfigError(
                f"codebook_dim {codebook_dim} is larger than the latent dimension {dim}: a lookup "
                f"dimension is a projection down; set codebook_dim to at most {dim} (e.g. 8 to 32) or leave it out"
            )
        self.codebook_size, self.dim, self.codebook_dim = codebook_size, dim, codebook_dim
        self.beta, self.use_ema, self.decay, self.eps = beta, ema, decay, eps
        self.cosine, self.dead_code_threshold = cosine, dead_code_threshold
        self.project_in = nn.Linear(dim, codebook_dim) if codebook_dim != dim else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if codebook_dim != dim else nn.Identity()
        init = torch.randn(codebook_size, codebook_dim)
        if cosine:
            init = F.normalize(init, dim=-1)
        else:
            init = init.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)  # taming's init
        if ema:
            self.register_buffer("codebook", init.clone())
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        # EMA of the assignments per batch (the EMA cluster size when the codes are EMA-updated)
        self.register_buffer("ema_count", torch.ones(codebook_size))

    # ------------------------------------------------------------------ lookup
    def codes(self) -> Tensor:
        """The codebook as the lookup sees it (l2-normalised with ``cosine``)."""
        return F.normalize(self.codebook, dim=-1) if self.cosine else self.codebook

    def lookup(self, indices: Tensor) -> Tensor:
        """Indices ``(b, h, w)`` -> latents ``(b, dim, h, w)`` (what ``forward`` gives the decoder)."""
        z = self.project_out(self.codes()[indices])
        return z.permute(0, 3, 1, 2).contiguous()

    def _flat_inputs(self, z: Tensor) -> Tensor:
        flat = self.project_in(z.permute(0, 2, 3, 1).reshape(-1, self.dim))
        return F.normalize(flat, dim=-1) if self.cosine else flat

    def nearest(self, flat: Tensor) -> Tensor:
        codes = self.codes()
        if self.cosine:
            return (flat @ codes.t()).argmax(dim=1)
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return distances.argmin(dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, z: Tensor, update: bool | None = None) -> Quantized:
        """Quantize ``z``; ``update`` (default: in training mode) updates the usage statistics,
        the EMA codes and restarts dead codes."""
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances and statistics in fp32
            z = z.float()
            flat = self._flat_inputs(z)
            indices = self.nearest(flat.detach())
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            q = self.codes()[indices]  # the codes this batch was assigned, before they move
            if self.training if update is None else update:
                counts = self._update(flat.detach(), indices, counts)
            commit = F.mse_loss(flat, q.detach())
            loss = self.beta * commit
            if not self.use_ema:
                loss = loss + F.mse_loss(q, flat.detach())
            q = flat + (q - flat).detach()  # straight-through
            latents = self.project_out(q).view(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()
        return Quantized(latents, indices.view(b, h, w), loss, commit.detach(), counts)

    # ------------------------------------------------------------------ training statistics
    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, counts: Tensor) -> Tensor:
        """EMA statistics (and codes) from this batch, over all ranks; dead-code restart.
        Returns the counts summed over ranks."""
        sums = torch.zeros_like(self.codebook).index_add_(0, indices, flat) if self.use_ema else None
        if _distributed():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        self.ema_count.lerp_(counts, 1 - self.decay)
        if self.use_ema:
            self.ema_sum.lerp_(sums, 1 - self.decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n
            self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self.restart_dead_codes(flat)
        return counts

    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor) -> int:
        """Re-initialise the codes whose EMA usage is under the threshold from random rows of
        ``flat`` (rank zero's batch, broadcast to the others); their usage restarts at the
        threshold. Returns the number of codes restarted (the same on every rank)."""
        dead = self.ema_count < self.dead_code_threshold  # the same on every rank: counts are all-reduced
        n = int(dead.sum())
        if n == 0:
            return 0
        pick = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        new = flat[pick].clone()
        if _distributed():
            dist.broadcast(new, src=0)
        if self.use_ema:
            self.codebook[dead] = new
            self.ema_sum[dead] = new * self.dead_code_threshold
        else:
            self.codebook.data[dead] = new
        self.ema_count[dead] = self.dead_code_threshold
        return n
