"""Two gloo processes run one training forward of the same quantizer on different batches, with
dead codes to restart; each writes its codebook, EMA counts and what it saw.

    python tests/ddp_quantizer_script.py OUT.json
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from networks.quantizer import VectorQuantizer


def work(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial codebook on both ranks
    vq = VectorQuantizer(16, dim=4, ema=True, decay=0.9, dead_code_threshold=0.8).train()
    vq.ema_count[10:] = 0.0  # six dead codes
    torch.manual_seed(100 + rank)  # each rank its own data and its own random stream
    z = torch.randn(2, 4, 3, 3) * (1 + rank)
    restarted = []
    original = vq.restart_dead_codes
    vq.restart_dead_codes = lambda flat: restarted.append(original(flat)) or restarted[-1]
    dead = (
        (vq.ema_count * 0.9 < 0.8).nonzero().flatten().tolist()
    )  # those still dead after this batch's counts
    vq(z)
    flat = vq._flat_inputs(z).tolist()
    results = [None, None]
    dist.all_gather_object(results, {"inputs": z.flatten().tolist(), "flat": flat, "restarted": restarted[0],
                                     "codebook": vq.codebook.tolist(), "ema_count": vq.ema_count.tolist(),
                                     "dead": [d for d in dead if vq.ema_count[d] == 0.8]})  # fmt: skip
    if rank == 0:
        with open(out, "w") as f:
            json.dump({str(r): v for r, v in enumerate(results)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(work, args=(sys.argv[1], port), nprocs=2)
