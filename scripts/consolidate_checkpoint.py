"""A sharded checkpoint (the folder ``FullyShardedStrategy(save_distributed_checkpoint=True)``
writes: one file of shards per rank, DCP) as one full ``.ckpt``, which ``load_method``, ``predict``
and a one-process or DDP run load and resume from like any other.

    python scripts/consolidate_checkpoint.py runs/<run>/checkpoints/last.ckpt runs/<run>/checkpoints/last-full.ckpt
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

METADATA = "meta.pt"  # the trainer state Lightning writes beside the shards


def _by_position(optimizer_state: dict) -> dict:
    """An optimizer state keyed by parameter names (as sharded checkpoints keep it) keyed by
    position instead, as ``Optimizer.state_dict()`` is: the parameters numbered in group order."""
    index, groups = {}, []
    for group in optimizer_state["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in optimizer_state["state"].items()}, "param_groups": groups}


def consolidate(folder: str, out: str) -> dict:
    """Write ``folder``'s full checkpoint to ``out``; the checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, METADATA)):
        raise FileNotFoundError(
            f"{folder} is not a sharded checkpoint (a folder with {METADATA} and .distcp files); a full .ckpt file "
            "needs no consolidation"
        )
    with tempfile.TemporaryDirectory() as tmp:
        flat = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(folder, flat)
        full = torch.load(flat, map_location="cpu", weights_only=False)
    checkpoint = torch.load(os.path.join(folder, METADATA), map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = full["state_dict"]
    names = sorted((k for k in full if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_by_position(full[k]) for k in names]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(checkpoint, out)
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the sharded checkpoint folder")
    p.add_argument("out", help="the full .ckpt to write")
    a = p.parse_args(argv)
    try:
        consolidate(a.folder, a.out)
    except FileNotFoundError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
