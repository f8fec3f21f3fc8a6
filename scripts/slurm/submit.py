"""Fill scripts/slurm/train.sbatch from options, print the script and the sbatch command, submit.

    python scripts/slurm/submit.py --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu -- \\
        fit --config configs/diffusion/shards_gpu.yaml --data.init_args.train_shards 'data/{00000..00999}.tar'

One task per GPU (``--ntasks-per-node`` = ``--gpus-per-node``), as Lightning requires; train.py
takes ``trainer.num_nodes`` and ``trainer.devices`` from SLURM. ``--dry-run`` prints without
submitting. The filled script is kept as ``<runs>/sbatch/<job name>-<time>.sbatch``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.sbatch")


def fill(template: str, options: dict[str, str | None]) -> str:
    """The template with the value of each ``#SBATCH --name=value`` line set from ``options``;
    a None value drops the line, a name not in the template is added after the last line."""
    lines, last, seen = template.splitlines(), 0, set()
    for i, line in enumerate(lines):
        match = re.match(r"#SBATCH --([\w-]+)=(\S+)(.*)$", line)
        if not match:
            continue
        last, name = i, match.group(1)
        if name in options:
            seen.add(name)
            lines[i] = None if options[name] is None else f"#SBATCH --{name}={options[name]}{match.group(3)}"
    extra = [f"#SBATCH --{k}={v}" for k, v in options.items() if k not in seen and v is not None]
    lines[last + 1 : last + 1] = extra
    return "\n".join(line for line in lines if line is not None) + "\n"


def split_train_args(args: list[str]) -> tuple[str, list[str]]:
    """``fit --config X rest...`` -> (X, rest)."""
    args = list(args)
    if args and args[0] == "fit":
        args = args[1:]
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2 :]
        if a.startswith("--config="):
            return a.split("=", 1)[1], args[:i] + args[i + 1 :]
    sys.exit("error: give the experiment after --: fit --config configs/<method>/<experiment>.yaml [options]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--ntasks-per-node", type=int, default=None, help="default: the GPUs per node (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--job-name", default="t2i")
    p.add_argument("--runs", default="runs", help="folder of the run directories and of the job logs")
    p.add_argument("--dry-run", action="store_true", help="print the script and the command, do not submit")
    p.add_argument("train", nargs=argparse.REMAINDER, help="-- fit --config ... (train.py's arguments)")
    a = p.parse_args()
    train = a.train[1:] if a.train[:1] == ["--"] else a.train
    config, rest = split_train_args(train)
    options = {
        "job-name": a.job_name,
        "nodes": str(a.nodes),
        "ntasks-per-node": str(a.ntasks_per_node or max(a.gpus_per_node, 1)),
        "gpus-per-node": str(a.gpus_per_node) if a.gpus_per_node else None,
        "cpus-per-task": str(a.cpus_per_task),
        "time": a.time,
        "output": os.path.join(a.runs, "slurm-%j.log"),
        "partition": a.partition,
    }
    script = fill(open(TEMPLATE).read(), options)
    folder = os.path.join(a.runs, "sbatch")
    path = os.path.join(folder, f"{a.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    command = ["sbatch", path, config, *rest, "--trainer.default_root_dir", a.runs]
    print(script)
    print("$ " + shlex.join(command), flush=True)
    if a.dry_run:
        return
    os.makedirs(folder, exist_ok=True)  # the log folder must exist before the job starts
    with open(path, "w") as f:
        f.write(script)
    sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
