"""Runs under SLURM: which runs SLURM manages, the run name of a job, start-up checks that turn
a wrong allocation into a clear error instead of a hang, and requeue on SIGUSR1 with an HPC
checkpoint written at a step boundary.

A run is *SLURM-managed* when it was started by ``srun`` inside a batch job (``SLURM_STEP_ID``
is set and the job is not an interactive shell named ``bash`` or ``interactive``, Lightning's
own rule). Then Lightning's ``SLURMEnvironment`` supplies ranks and the master address, and the
number of tasks must match ``num_nodes x devices``. A run started by hand inside an allocation
(``salloc``, ``srun --pty bash``) is a plain local run that ignores SLURM's variables.
``T2I_SLURM=1`` or ``T2I_SLURM=0`` forces either behaviour.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import threading

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

HPC_PATTERN = "hpc_ckpt_*.ckpt"


def slurm_managed() -> bool:
    forced = os.environ.get("T2I_SLURM")
    if forced in ("0", "1"):
        return forced == "1"
    return "SLURM_STEP_ID" in os.environ and "SLURM_NTASKS" in os.environ and os.environ.get(
        "SLURM_JOB_NAME"
    ) not in ("bash", "interactive")


def slurm_run_name() -> str | None:
    """The job's run name, the same in every attempt of a requeued job: the job id, or
    ``<array job id>_<task id>`` for a task of an array job."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def hpc_number(path: str) -> int:
    match = re.search(r"hpc_ckpt_(\d+)\.ckpt$", path)
    return int(match.group(1)) if match else -1


def newest_hpc_checkpoint(run_dir: str) -> str | None:
    """The HPC checkpoint with the highest number in ``run_dir`` that is whole, or None. A damaged
    one (written before checkpoints were atomic) is passed over with a warning."""
    from .checkpoint_io import checkpoint_problem

    for path in sorted(glob.glob(os.path.join(run_dir, HPC_PATTERN)), key=hpc_number, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        sys.stderr.write(f"SLURM: passing over {path}: it {problem}\n")
    return None


def first_node(nodelist: str) -> str:
    """The first host name of a SLURM node list (``n[1-2],gpu7`` -> ``n1``)."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        return nodelist
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def check_allocation(num_nodes: int, devices) -> list[str]:
    """Problems of a SLURM-managed start, each naming the setting and the fix (empty: none)."""
    problems = []
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    nnodes = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES")
    if not per_node:
        problems.append(
            "SLURM runs need --ntasks-per-node (one task per device), not --ntasks: set #SBATCH --ntasks-per-node"
        )
    elif isinstance(devices, int) and devices > 0 and int(per_node) != devices:
        problems.append(
            f"--ntasks-per-node is {per_node} but trainer.devices is {devices}: Lightning needs one task per "
            f"device; set --trainer.devices {per_node} (scripts/slurm/train.sbatch does) or change --ntasks-per-node"
        )
    if nnodes and int(nnodes) != int(num_nodes):
        problems.append(
            f"the job has {nnodes} node(s) but trainer.num_nodes is {num_nodes}: set --trainer.num_nodes {nnodes}"
        )
    nodelist = os.environ.get("SLURM_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if nodelist:
        host = first_node(nodelist)
        try:
            socket.gethostbyname(host)
        except OSError:
            problems.append(
                f"node name {host!r} (the first of SLURM_NODELIST {nodelist!r}, the DDP master address) does not "
                "resolve on this node: fix the cluster's DNS or /etc/hosts, or set MASTER_ADDR to its address"
            )
    return problems


class SlurmRequeue(Callback):
    """Pre-emption and the time limit under SLURM (``#SBATCH --signal=SIGUSR1@90``, ``--requeue``).

    On SIGUSR1, training stops at the end of the current step on every rank (the ranks agree on
    the step): each writes ``<run>/hpc_ckpt_<n>.ckpt``, the whole state, and rank zero requeues
    the job with ``scontrol requeue``. The requeued job starts in the same run directory (its
    name is the job id) and ``train.py`` resumes it from the newest HPC checkpoint, which takes
    precedence over ``last.ckpt``. The handler does nothing in a DataLoader worker (a forked
    child that inherits it), so a signal that reaches a worker never writes a second checkpoint.

    Lightning's own SLURM requeue is turned off in SLURM-managed runs: it writes the checkpoint
    inside the signal handler, possibly in the middle of a step.
    """

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True):
        self.signum, self.requeue = signum, requeue
        self.requested = False
        self.saved: str | None = None
        self._pid: int | None = None
        self._previous = None

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker: the training process handles it
        self.requested = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._pid, self.requested = os.getpid(), False
        self._previous = signal.signal(self.signum, self._on_signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested or self.saved:
            return
        number = max([hpc_number(p) for p in glob.glob(os.path.join(trainer.default_root_dir, HPC_PATTERN))] + [0]) + 1
        self.saved = os.path.join(trainer.default_root_dir, f"hpc_ckpt_{number}.ckpt")
        trainer.save_checkpoint(self.saved)  # every rank takes part; rank zero writes
        trainer.strategy.barrier("hpc_checkpoint")
        rank_zero_info(f"SIGUSR1: saved {self.saved} at step {trainer.global_step}")
        if trainer.is_global_zero and self.requeue:
            job = slurm_run_name()
            result = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
            if result.returncode == 0:
                rank_zero_info(f"requeued SLURM job {job}; it resumes from {os.path.basename(self.saved)}")
            else:
                rank_zero_warn(f"scontrol requeue {job} failed ({result.stderr.strip()}); resume by resubmitting")
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None


def link_job_log(run_dir: str) -> None:
    """Link the job's output file (``#SBATCH --output``) into the run directory as ``slurm.log``."""
    try:
        out = subprocess.run(["scontrol", "show", "job", os.environ["SLURM_JOB_ID"]], capture_output=True, text=True, timeout=10)
    except (OSError, KeyError, subprocess.SubprocessError):
        return
    match = re.search(r"StdOut=(\S+)", out.stdout)
    if match and os.path.isfile(match.group(1)):
        os.makedirs(run_dir, exist_ok=True)
        link = os.path.join(run_dir, "slurm.log")
        if os.path.islink(link):
            os.remove(link)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(match.group(1)), link)


RENDEZVOUS_ENV = "T2I_RENDEZVOUS_TIMEOUT"


def rendezvous_message(seconds: float) -> str:
    nodelist = os.environ.get("SLURM_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "?")
    return (
        f"rank {os.environ.get('SLURM_PROCID', '?')} on {socket.gethostname()}: the ranks have not all met after "
        f"{seconds:.0f} s (waiting for {os.environ.get('SLURM_NTASKS', '?')} tasks at {first_node(nodelist)}). "
        "Check that srun started every task (--ntasks-per-node equal to trainer.devices, trainer.num_nodes equal to "
        "--nodes), that the first node's name resolves and its port is open between nodes, and the other tasks' logs"
    )


def start_rendezvous_watchdog() -> threading.Timer:
    """A message (not a kill) if the ranks have not met ``T2I_RENDEZVOUS_TIMEOUT`` seconds (default
    300) after start-up: a hang of the first collective says why instead of waiting in silence."""
    seconds = float(os.environ.get(RENDEZVOUS_ENV, 300))
    timer = threading.Timer(seconds, lambda: print("error: " + rendezvous_message(seconds), file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    return timer


class SharedRunDirCheck(Callback):
    """Every node must see the run directory (checkpoints written by rank zero are read by all
    ranks on resume): rank zero writes a marker there, every rank looks for it, and if one does
    not see it, all stop with an error naming the setting. Its end also ends the rendezvous
    watchdog: the ranks have met."""

    def __init__(self, watchdog: threading.Timer | None = None):
        self.watchdog = watchdog

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.watchdog is not None:  # setup runs after the process group is up
            self.watchdog.cancel()
        if trainer.world_size <= 1 or trainer.num_nodes <= 1:
            return
        marker = os.path.join(trainer.default_root_dir, f".shared-{slurm_run_name() or 'run'}")
        if trainer.is_global_zero:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            with open(marker, "w") as f:
                f.write(socket.gethostname())
        trainer.strategy.barrier("shared_run_dir")
        seen = trainer.strategy.reduce_boolean_decision(os.path.exists(marker), all=True)
        if not seen:
            raise RuntimeError(
                f"the run directory {trainer.default_root_dir!r} is not shared by all nodes (rank "
                f"{trainer.global_rank} on {socket.gethostname()} does not see the file rank zero wrote there): "
                "set --trainer.default_root_dir to a shared file system"
            )
