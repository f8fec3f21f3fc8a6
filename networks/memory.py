"""Tensor memory of a step, counted without a GPU: on the meta device (no memory at all) or on the
CPU, the same way.

``LiveBytes`` is a dispatch mode that sees every tensor an operator returns and keeps the bytes of
the distinct storages still alive, and their peak. On the meta device the shapes, dtypes and
lifetimes are the real ones, so a training step traced there allocates nothing and counts what a
device would hold: activations kept for the backward pass, gradients, optimizer state and the
temporaries in between (the allocator's rounding and caching are not counted).

``on_meta()`` makes ``F.scaled_dot_product_attention`` on meta tensors use a fused kernel (the CPU
flash kernel, which has meta shapes), as a GPU or a CPU would; without it the meta device takes
the math path and counts the ``(b, heads, n, n)`` attention matrices that fused kernels never
keep. It also lets code open ``torch.autocast`` on the meta device type, and takes a boolean
index on meta tensors to select every element (an upper bound).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that operators create while the mode is on and that are still alive
    (``live``), and the most alive at once since the last ``reset_peak`` (``peak``). Storages made
    before the mode (parameters, the batch) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError):
            if func not in _META_STAND_INS or not any(getattr(a, "is_meta", False) for a in args):
                raise
            out = _META_STAND_INS[func](*args, **kwargs)  # an output of the size the op makes
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()  # one Python object per storage, alive as long as it is
        key = id(storage)
        if key in self._sizes:  # a view or an in-place result: already counted
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


def _bincount(values, weights=None, minlength=0):
    return torch.zeros(int(minlength), dtype=torch.long if weights is None else weights.dtype, device="meta")


# data-dependent operators with no meta kernel: a stand-in output of the size the arguments tell
# (counts of codebook use), values unknown; a scalar read from a meta tensor (``.item()``, ``int()``)
# reads 0, so data-dependent bookkeeping (restarting dead codes) takes its branch for "none"
_META_STAND_INS = {
    torch.ops.aten.bincount.default: _bincount,
    torch.ops.aten._local_scalar_dense.default: lambda tensor: False if tensor.dtype == torch.bool else 0,
}


def _fused_sdpa(original):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or kwargs:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)  # fmt: skip
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the fused kernel takes an additive mask
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        if query.dim() == 3:  # (b, n, d): one head
            return sdpa(query[:, None], key[:, None], value[:, None],
                        None if attn_mask is None else attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask,
                        dropout_p, is_causal, scale)[:, 0]  # fmt: skip
        if key.shape[1] != query.shape[1]:  # grouped heads: as the math path does
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]

    return sdpa


class _Autocast(torch.autocast):
    """``torch.autocast`` that takes the meta device for the CPU (code that switches autocast off
    around a block names its tensors' device type)."""

    def __init__(self, device_type: str, *args, **kwargs):
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


@contextmanager
def on_meta() -> Iterator[None]:
    """While open: ``F.scaled_dot_product_attention`` on meta tensors runs through a fused kernel,
    and ``torch.autocast("meta", ...)`` is accepted."""
    from torch.fx.experimental import _config as fx_config

    sdpa, autocast = F.scaled_dot_product_attention, torch.autocast
    F.scaled_dot_product_attention, torch.autocast = _fused_sdpa(sdpa), _Autocast
    try:  # a boolean index selects everything: an upper bound (MaskGIT's loss on its masked tokens)
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            yield
    finally:
        F.scaled_dot_product_attention, torch.autocast = sdpa, autocast


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    return total
