"""Start two-process CPU DDP runs (Lightning's own launcher, gloo) many times and report the ones
that hang, with the Python stacks of every process of a hung run (py-spy).

    python scripts/ddp_start_stress.py --starts 200 --timeout 90 --out runs/ddp_stress
    python scripts/ddp_start_stress.py --starts 100 --timeout 240 --command "python tests/ddp_random_script.py out.json 0"

Each start is a fresh ``fit`` of a tiny module for a few steps on two processes, as the tests'
DDP runs are (or, with ``--command``, any command, such as one of the tests' DDP scripts). A start that has not finished after ``--timeout`` seconds is a hang: ``py-spy dump``
of each of its processes goes to ``<out>/hang_<i>/stacks.txt`` (with their command lines and the
run's output so far), then the run is killed. Prints the number of starts, hangs, failures and
the median and slowest start-to-finish times.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(steps: int) -> None:
    """One start: two processes, a few optimizer steps, then exit."""
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.process_group import destroy_at_exit

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    destroy_at_exit()
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Tiny(), DataLoader(data, batch_size=8))


def _session_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                continue
    return sorted(pids)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def dump_stacks(pgid: int, folder: str, output: str) -> None:
    """py-spy stacks (with native frames) of every process in the group, into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")  # a virtual environment's, when not on PATH
    spy = shutil.which("py-spy") or (beside if os.path.exists(beside) else None)
    lines = []
    for pid in _session_pids(pgid):
        lines.append(f"===== pid {pid}: {_cmdline(pid)}")
        if spy is None:
            lines.append("(py-spy is not installed: pip install py-spy)")
            continue
        dump = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
        lines.append(dump.stdout + dump.stderr)
    sockets = subprocess.run(["ss", "-tanp"], capture_output=True, text=True) if shutil.which("ss") else None
    lines.append("===== TCP sockets (ss -tanp)\n" + (sockets.stdout if sockets else "(ss is not installed)"))
    lines.append("===== output of the run so far\n" + output)
    with open(os.path.join(folder, "stacks.txt"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=200)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds before a start counts as hung")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="runs/ddp_stress")
    p.add_argument("--command", help="start this command line instead (run from a fresh temporary folder; "
                   "'python' is this interpreter, relative paths are the repository's), e.g. a test's DDP script")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.steps)
        return
    os.makedirs(a.out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(a.steps)]
    if a.command:
        argv = shlex.split(a.command)
        argv[0] = sys.executable if argv[0] in ("python", "python3") else argv[0]
        argv = [argv[0]] + [os.path.join(ROOT, x) if os.path.exists(os.path.join(ROOT, x)) else x for x in argv[1:]]
    times, hangs, failures = [], [], []
    for i in range(a.starts):
        with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryFile("w+") as log:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                code = proc.wait(timeout=a.timeout)
                times.append(time.perf_counter() - start)
                if code != 0:
                    log.seek(0)
                    failures.append((i, code, log.read()[-2000:]))
            except subprocess.TimeoutExpired:
                log.seek(0)
                folder = os.path.join(a.out, f"hang_{i}")
                dump_stacks(proc.pid, folder, log.read())
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                hangs.append(i)
                print(f"start {i}: hung after {a.timeout:.0f} s; stacks in {folder}/stacks.txt", flush=True)
        if (i + 1) % 10 == 0:
            print(f"{i + 1} starts, {len(hangs)} hung, {len(failures)} failed", flush=True)
    for i, code, tail in failures:
        print(f"start {i} exited with {code}:\n{tail}")
    median = statistics.median(times) if times else float("nan")
    print(f"starts {a.starts}, hangs {len(hangs)}, failures {len(failures)}, "
          f"median {median:.1f} s, slowest {max(times, default=float('nan')):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
