"""Multi-node training under a real SLURM: a two-node cluster (munged, slurmctld and two slurmd)
started on this machine, the real ``scripts/slurm/train.sbatch``, CPU DDP over gloo.

- two nodes train together, read disjoint shards and make the same number of batches;
- SIGUSR1 (what ``--signal=SIGUSR1@90`` sends) writes an HPC checkpoint at a step boundary and
  requeues the job; the next attempt resumes at that step in the same run directory and W&B run.

Skipped, with the reason, when the SLURM binaries are absent (``apt-get install -y slurm-wlm munge``)
or when not run as root. The start-up checks (allocation, node names, hand-started runs) are
tested without a cluster.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_cli import ROOT, run_cli

from callbacks.slurm import check_allocation, first_node, slurm_managed, slurm_run_name

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
MISSING = [b for b in BINARIES if shutil.which(b, path=SBIN_PATH) is None]
NODES = ("t2in1", "t2in2")
needs_slurm = pytest.mark.skipif(
    bool(MISSING) or os.geteuid() != 0,
    reason=f"SLURM binaries missing ({', '.join(MISSING)}; apt-get install -y slurm-wlm munge)"
    if MISSING
    else "the test cluster's daemons need root",
)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _conf(d: str, ports: list[int]) -> str:
    nodes = "\n".join(
        f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs=2 RealMemory=2000 State=UNKNOWN"
        for n, p in zip(NODES, ports[1:])
    )
    return f"""ClusterName=t2itest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/linear
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
MailProg=/bin/true
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: str) -> int | None:
    try:
        return int(open(path).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module")
def cluster():
    """A two-node SLURM cluster on this machine; stops exactly the daemons it started."""
    import tempfile

    d = tempfile.mkdtemp(prefix="t2islurm")  # short: the munge socket path has a length limit
    os.makedirs(f"{d}/state")
    os.makedirs(f"{d}/spool")
    env = {**os.environ, "SLURM_CONF": f"{d}/slurm.conf", "PATH": SBIN_PATH}
    with open(f"{d}/slurm.conf", "w") as f:
        f.write(_conf(d, _free_ports(3)))
    added_hosts = False
    try:
        socket.gethostbyname(NODES[0])
    except OSError:  # the node names must resolve for Lightning's MASTER_ADDR
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(NODES)}  # t2i test cluster\n")
        added_hosts = True
    pids = []
    try:
        subprocess.run(["munged", "--force", f"--socket={d}/munge.sock", f"--pid-file={d}/munged.pid",
                        f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"], check=True, env=env)  # fmt: skip
        pids.append(f"{d}/munged.pid")
        subprocess.run(["slurmctld", "-f", f"{d}/slurm.conf"], check=True, env=env)
        pids.append(f"{d}/slurmctld.pid")
        for n in NODES:
            subprocess.run(["slurmd", "-f", f"{d}/slurm.conf", "-N", n], check=True, env=env)
            pids.append(f"{d}/slurmd-{n}.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t %D"], capture_output=True, text=True, env=env).stdout
            if out.split() == ["idle", "2"]:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the test cluster did not come up: sinfo says {out!r}; logs in {d}")
        yield {"dir": d, "env": env}
    finally:
        subprocess.run(["scancel", "--full", "--quiet", "-u", "root"], env=env, capture_output=True)
        for path in reversed(pids):
            pid = _pid(path)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if added_hosts:
            with open("/etc/hosts") as f:
                lines = [line for line in f if "# t2i test cluster" not in line]
            with open("/etc/hosts", "w") as f:
                f.writelines(lines)
        shutil.rmtree(d, ignore_errors=True)


def _job_env(cluster) -> dict:
    return {**cluster["env"], "PATH": os.path.dirname(sys.executable) + ":" + cluster["env"]["PATH"],
            "PYTHONPATH": os.path.join(ROOT, "tests") + os.pathsep + ROOT, "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def _submit(cluster, runs, shards, *options) -> str:
    cmd = ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0",
           "--cpus-per-task", "1", "--chdir", ROOT, "--output", os.path.join(runs, "slurm-%j.log"),
           os.path.join(ROOT, "scripts", "slurm", "train.sbatch"), os.path.join(ROOT, "tests", "configs", "slurm_tiny.yaml"),
           "--trainer.default_root_dir", runs, "--data.init_args.train_shards", os.path.join(shards, "train"), *options]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_job_env(cluster))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _job(cluster, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=cluster["env"]).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _wait(cluster, job: str, until, timeout: float = 150) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(cluster, job)
        if until(info):
            return info
        time.sleep(0.5)
    pytest.fail(f"job {job} did not get there in {timeout} s: {info}")


def _done(info: dict) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def _probe(run: str) -> list[list[str]]:
    rows = []
    for path in sorted(glob.glob(os.path.join(run, "probe_rank*.tsv"))):
        rows += [line.rstrip("\n").split("\t") for line in open(path)]
    return rows  # attempt, node, rank, step, keys


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def reference(cluster, shapes16, tmp_path_factory):
    """An uninterrupted 2-node run of 16 steps with a checkpoint at every step."""
    runs = str(tmp_path_factory.mktemp("slurm_runs"))
    job = _submit(cluster, runs, shapes16, "--trainer.max_steps", "16")
    info = _wait(cluster, job, _done)
    log = open(os.path.join(runs, f"slurm-{job}.log")).read()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    return {"job": job, "run": os.path.join(runs, job), "log": log}


@needs_slurm
@pytest.mark.slow  # the requeue test below trains on the same two-node cluster
def test_two_nodes_train_together_on_disjoint_shards_with_equal_batch_counts(reference):
    rows = _probe(reference["run"])
    by_rank = {r: [row for row in rows if row[2] == r] for r in ("0", "1")}
    assert {row[1] for row in by_rank["0"]} == {NODES[0]} and {row[1] for row in by_rank["1"]} == {NODES[1]}
    assert [int(row[3]) for row in by_rank["0"]] == list(range(1, 17)) == [int(row[3]) for row in by_rank["1"]]
    shards = {r: {int(k[len("train"):]) // 100 for row in by_rank[r] for k in row[4].split(",")} for r in by_rank}
    assert shards["0"] and shards["1"] and not shards["0"] & shards["1"], shards  # 100 samples per shard
    assert _ckpt(os.path.join(reference["run"], "checkpoints", "last.ckpt"))["global_step"] == 16
    assert os.path.islink(os.path.join(reference["run"], "slurm.log"))


@needs_slurm
def test_sigusr1_requeues_and_the_next_attempt_resumes_at_the_saved_step(cluster, reference, shapes16, tmp_path):
    runs = str(tmp_path)
    job = _submit(cluster, runs, shapes16, "--trainer.max_steps", "16", "--trainer.callbacks.sleep", "0.4")
    run = os.path.join(runs, job)
    deadline = time.time() + 120
    while len([r for r in _probe(run) if r[2] == "0"]) < 4 and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=cluster["env"])
    info = _wait(cluster, job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", timeout=60)
    hpc = glob.glob(os.path.join(run, "hpc_ckpt_*.ckpt"))
    assert [os.path.basename(p) for p in hpc] == ["hpc_ckpt_1.ckpt"]  # one, though the workers got the signal too
    saved = _ckpt(hpc[0])
    # SLURM makes a requeued job wait before it is eligible again; release it now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=cluster["env"])
    info = _wait(cluster, job, _done)
    log = open(os.path.join(runs, f"slurm-{job}.log")).read()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]

    rows = _probe(run)
    first = [int(r[3]) for r in rows if r[0] == "0" and r[2] == "0"]
    second = [int(r[3]) for r in rows if r[0] == "1" and r[2] == "0"]
    k = saved["global_step"]
    # the first attempt made steps 1..k (SLURM may kill it before the probe writes step k down);
    # the second resumed at k, not at 0
    assert first == list(range(1, len(first) + 1)) and len(first) >= k - 1 and k >= 4, (first, k)
    assert second == list(range(k + 1, 17)), (second, k)
    assert f"resuming {run} from hpc_ckpt_1.ckpt" in log
    assert _ckpt(os.path.join(run, "checkpoints", "last.ckpt"))["global_step"] == 16
    assert sorted(os.listdir(runs)) == sorted([job, f"slurm-{job}.log"])  # one run directory ...
    assert len(glob.glob(os.path.join(runs, "*", "config.yaml"))) == 1  # ... with one config.yaml
    attempts = sorted(glob.glob(os.path.join(run, "wandb", "offline-run-*")))
    assert len(attempts) == 2 and all(p.endswith(f"-{job}") for p in attempts)  # one W&B id, both attempts
    # the state at the signal is exactly the uninterrupted run's state at the same step
    same = _ckpt(os.path.join(reference["run"], "checkpoints", f"step-step={k}.ckpt"))
    for name, value in same["state_dict"].items():
        assert torch.allclose(saved["state_dict"][name], value, atol=1e-6), name
    for a, b in zip(saved["optimizer_states"][0]["state"].values(), same["optimizer_states"][0]["state"].values()):
        assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in ("exp_avg", "exp_avg_sq")), "optimizer state"


@needs_slurm
def test_the_main_jobs_data_is_rendered_once_when_two_nodes_start_on_a_fresh_folder(cluster, tmp_path):
    """The first multi-node run on a fresh checkout: both nodes' local rank zero prepare the shapes
    data into the same (shared) folder at once; one renders, the other waits, both then train."""
    runs, root = str(tmp_path / "runs"), str(tmp_path / "data" / "shapes16")
    os.makedirs(runs)
    cmd = ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0",
           "--cpus-per-task", "1", "--chdir", ROOT, "--output", os.path.join(runs, "slurm-%j.log"),
           os.path.join(ROOT, "scripts", "slurm", "train.sbatch"), os.path.join(ROOT, "tests", "configs", "slurm_tiny.yaml"),
           "--data", os.path.join(ROOT, "configs", "data", "shapes16.yaml"), "--data.init_args.root", root,
           "--data.init_args.num_train", "1200", "--data.init_args.num_val", "32", "--data.init_args.shard_size", "100",
           "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1",
           "--trainer.default_root_dir", runs, "--trainer.max_steps", "4"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_job_env(cluster))
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    info = _wait(cluster, job, _done)
    log = open(os.path.join(runs, f"slurm-{job}.log")).read()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert sorted(os.listdir(root)) == ["heldout.jsonl", "manifest.json", "train", "val"]
    assert len(os.listdir(os.path.join(root, "train"))) == 12 and os.listdir(tmp_path / "data") == ["shapes16"]
    rows = _probe(os.path.join(runs, job))
    assert sorted({row[2] for row in rows}) == ["0", "1"] and max(int(row[3]) for row in rows) == 4


# ---------------------------------------------------------------------------------- no cluster needed
def test_who_counts_as_a_slurm_run(monkeypatch):
    for var in ("SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "T2I_SLURM", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert not slurm_managed()  # salloc, then python by hand: a plain local run
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert slurm_managed()  # srun in a batch job
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")
    assert not slurm_managed()  # srun --pty bash, then python by hand
    monkeypatch.setenv("T2I_SLURM", "1")
    assert slurm_managed()
    assert slurm_run_name() == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_run_name() == "70_3"
    assert first_node("gpu[07-09,12],cpu1") == "gpu07" and first_node("n1") == "n1"


def test_a_wrong_allocation_is_one_clear_error_before_any_work(monkeypatch, tmp_path):
    env = {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODELIST": "localhost", "SLURM_JOB_NAME": "t2i"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert check_allocation(1, 2) == [] == check_allocation("1", "2")
    assert "trainer.devices is 1" in check_allocation(1, 1)[0] and "--trainer.devices 2" in check_allocation(1, 1)[0]
    assert "trainer.num_nodes is 2" in check_allocation(2, 2)[0] and "devices is 1" in check_allocation(1, "1")[0]
    monkeypatch.setenv("SLURM_NODELIST", "nosuchnode-t2i[1-2]")
    assert "'nosuchnode-t2i1'" in check_allocation(1, 2)[0] and "does not resolve" in check_allocation(1, 2)[0]
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    assert "--ntasks-per-node" in check_allocation(1, 2)[0]
    proc = run_cli(["fit", "--config", os.path.join(ROOT, "tests", "configs", "tiny.yaml"), "--data", os.path.join(ROOT, "configs", "data", "shapes16.yaml"), "--trainer.devices", "1",
                    "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.init_args.root", str(tmp_path / "d")],
                   tmp_path, expect_failure=True, env_extra=env, timeout=120)  # fmt: skip
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --ntasks-per-node is 2 but trainer.devices is 1")
    assert not os.path.exists(tmp_path / "runs" / "5" / "checkpoints")


def test_a_rank_that_waits_for_the_others_says_why(tmp_path):
    """Two tasks announced, one started: the first collective would wait in silence; after
    T2I_RENDEZVOUS_TIMEOUT seconds the rank prints what to check."""
    port = _free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID=str(port), SLURM_STEP_ID="0", SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2",
               SLURM_NODELIST="localhost", SLURM_JOB_NAME="t2i", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
               T2I_RENDEZVOUS_TIMEOUT="3", WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))  # fmt: skip
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "fit", "--config", os.path.join(ROOT, "tests", "configs", "tiny.yaml"),
           "--data", os.path.join(ROOT, "configs", "data", "shapes16.yaml"), "--trainer.devices", "2",
           "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.logger", "false",
           "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.init_args.root", str(tmp_path / "d")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline, lines = time.time() + 120, []
        while time.time() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "have not all met" in line or (not line and proc.poll() is not None):
                break
        assert "have not all met after 3 s (waiting for 2 tasks at localhost)" in "".join(lines), "".join(lines)[-3000:]
        assert "--ntasks-per-node equal to trainer.devices" in "".join(lines)
    finally:
        proc.kill()
        proc.wait()


def test_submit_fills_the_template_and_prints_what_it_submits(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "slurm", "submit.py"), "--nodes", "4", "--gpus-per-node", "8",
           "--time", "12:00:00", "--partition", "gpu", "--runs", str(tmp_path), "--dry-run", "--",
           "fit", "--config", "configs/diffusion/shards_gpu.yaml", "--data.init_args.batch_size", "32"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue"):  # fmt: skip
        assert line in out, line
    assert f"configs/diffusion/shards_gpu.yaml --data.init_args.batch_size 32 --trainer.default_root_dir {tmp_path}" in out
    assert not os.listdir(tmp_path)  # a dry run writes nothing
    script = out.split("\n$ ")[0]
    (tmp_path / "s.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sbatch")]).returncode == 0
    cpu = subprocess.run(cmd[:2] + ["--gpus-per-node", "0", "--ntasks-per-node", "2", "--dry-run", "--", "fit", "--config", "x.yaml"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "--gpus-per-node" not in cpu.split("\n$ ")[0] and "#SBATCH --ntasks-per-node=2" in cpu


def test_a_run_directory_one_node_cannot_see_stops_every_rank(tmp_path):
    """SharedRunDirCheck with a stand-in trainer whose other node does not see rank zero's file."""
    from types import SimpleNamespace

    from callbacks.slurm import SharedRunDirCheck

    class Strategy:
        def barrier(self, name=None):
            pass

        def reduce_boolean_decision(self, decision, all=True):
            return False  # another rank answered "not seen"

    trainer = SimpleNamespace(world_size=2, num_nodes=2, is_global_zero=True, global_rank=0,
                              default_root_dir=str(tmp_path / "run"), strategy=Strategy())  # fmt: skip
    with pytest.raises(RuntimeError, match="not shared by all nodes.*--trainer.default_root_dir to a shared file system"):
        SharedRunDirCheck().setup(trainer, None, "fit")
    trainer.strategy.reduce_boolean_decision = lambda decision, all=True: decision  # every rank sees it
    SharedRunDirCheck().setup(trainer, None, "fit")
