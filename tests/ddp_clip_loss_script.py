"""Two gloo processes train one step of tiny image and text towers with the CLIP (or SigLIP) loss
on their halves of one batch, averaging gradients as DDP does; rank 0 writes the mean loss and
the averaged gradients.

    python tests/ddp_clip_loss_script.py OUT.pt clip|siglip
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from networks.clip_loss import clip_loss, siglip_loss


def towers():
    torch.manual_seed(0)
    image, text = torch.nn.Linear(5, 8), torch.nn.Linear(7, 8)
    scale, bias = torch.nn.Parameter(torch.tensor(2.0)), torch.nn.Parameter(torch.tensor(-3.0))
    return image, text, scale, bias


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=g), torch.randn(6, 7, generator=g)


def step(images, texts, kind):
    """(loss, gradients by name) of one forward and backward on ``images``, ``texts``."""
    image, text, scale, bias = towers()
    fi, ft = F.normalize(image(images), dim=-1), F.normalize(text(texts), dim=-1)
    loss = clip_loss(fi, ft, scale) if kind == "clip" else siglip_loss(fi, ft, scale, bias)
    loss.backward()
    params = {"image.weight": image.weight, "image.bias": image.bias, "text.weight": text.weight,
              "text.bias": text.bias, "scale": scale, "bias": bias}  # fmt: skip
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    return loss.detach(), grads


def work(rank: int, out: str, kind: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    images, texts = batch()
    loss, grads = step(images[rank * 3 : rank * 3 + 3], texts[rank * 3 : rank * 3 + 3], kind)
    for g in [loss, *grads.values()]:  # what DDP does to gradients (and what a logged loss shows)
        dist.all_reduce(g)
        g /= 2
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    port = 29500 + os.getpid() % 1000
    mp.spawn(work, args=(sys.argv[1], sys.argv[2], port), nprocs=2)
