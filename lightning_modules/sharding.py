"""Fully sharded data parallel training (FSDP2's ``fully_shard`` through Lightning's
``ModelParallelStrategy``), for models whose weights, gradients and optimizer state do not fit one
GPU beside their activations.

Why FSDP2 and ``ModelParallelStrategy`` rather than Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 is
in maintenance and needs an accelerator (torch refuses it on CPU: "FSDP needs a non-CPU accelerator
device"), while ``fully_shard`` keeps each parameter a ``DTensor`` of the same name, works on CPU
with gloo (so it is tested here on two processes), and shards any module we choose, one block at a
time.

What is sharded (``shard_module``): every direct child network of the method that has trainable
parameters, block by block (each element of its ``nn.ModuleList``s: a UNet's res and attention
blocks, a transformer's blocks, a CLIP tower's layers), then the network itself; and each one's
EMA twin (``ema_<name>``) in exactly the same way, so that each rank keeps the EMA of its own
shard, in fp32, with no full copy anywhere (``ema_update`` is elementwise on the local shards).
Frozen parts (a frozen text encoder, an autoencoder, a guiding CLIP) stay whole on every rank and
out of the optimizer. Forward passes gather a block's weights for the time it runs, so sampling
works on every rank, and every rank must take part (the sample callbacks do, when sharded).

Checkpoints: ``save_distributed_checkpoint: false`` (the default here) gathers a full checkpoint
on rank 0, an ordinary ``.ckpt`` that ``load_method``, ``predict`` and a one-process run load as
any other; ``true`` writes a folder of per-rank shards (DCP), which
``python scripts/consolidate_checkpoint.py FOLDER OUT.ckpt`` turns into a full one. Both resume.

Manual optimisation (the GANs, VQGAN, the KL autoencoder) is refused with the strategy that works
(DDP): their two optimizers toggle ``requires_grad`` on shared modules between the two backward
passes, which this code does not shard yet.
"""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from networks.errors import ConfigError


class FullyShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as plain FSDP: one data-parallel dimension over every process
    (no tensor parallelism), full checkpoints unless ``save_distributed_checkpoint``.

    Args:
        save_distributed_checkpoint: write per-rank shards (a folder) instead of one full file.
        **kwargs: the other ``ModelParallelStrategy`` arguments (``process_group_backend``, ``timeout``).
    """

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)  # fmt: skip

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process, one dimension
        super().setup_environment()


def blocks(network: nn.Module) -> list[nn.Module]:
    """The units FSDP gathers one at a time: the elements of every ``nn.ModuleList`` inside
    ``network`` that are not themselves lists (a UNet level's list of res and attention blocks is
    looked into)."""
    found = []
    for module in network.modules():
        if isinstance(module, nn.ModuleList):
            found += [m for m in module if not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    return found


def sharded_networks(module: nn.Module) -> list[str]:
    """Names of the direct children to shard: those with trainable parameters, and their
    ``ema_<name>`` twins."""
    names = [n for n, child in module.named_children() if any(p.requires_grad for p in child.parameters())]
    twins = [f"ema_{n}" for n in names if isinstance(getattr(module, f"ema_{n}", None), nn.Module)]
    return names + twins


def shard_module(module, mesh) -> list[str]:
    """Shard ``module``'s trainable networks and their EMA twins block by block over ``mesh``;
    the names sharded. A method with manual optimisation is refused."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not module.automatic_optimization:
        raise ConfigError(
            f"{type(module).__name__} steps several optimizers by hand (manual optimisation), which FullyShardedStrategy "
            "does not shard: train it with DDP (configs/trainer/gpu_ddp_gan.yaml or gpu_ddp_autoencoder.yaml)"
        )
    names = sharded_networks(module)
    for name in names:
        network = getattr(module, name)
        if isinstance(network, FSDPModule):
            continue  # configure_model runs again (e.g. trainer.fit after trainer.validate)
        for block in blocks(network):
            fully_shard(block, mesh=mesh)
        fully_shard(network, mesh=mesh)
    return names


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s weights are sharded over processes (every rank must run each forward)."""
    return getattr(module, "_device_mesh", None) is not None
