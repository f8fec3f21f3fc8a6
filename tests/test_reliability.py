"""Every run leaves a state it can resume from: data prepared once by many processes at once,
a ``last.ckpt`` at every end of ``fit``, checkpoints that are whole or absent, skip counts
summed over DDP ranks, and one kind of progress output in a log file."""

import glob
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from conftest import run_processes
from PIL import Image
from test_cli import ROOT, TINY, run_cli

from callbacks.checkpoint_io import (
    AtomicCheckpointIO,
    atomic_torch_save,
    checkpoint_problem,
    remove_partial_writes,
)
from datamodules.prepare import prepare_once, read_manifest

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}

# Each child waits for the "go" file, so the processes start preparing at the same moment.
CHILD = r"""
import hashlib, json, os, sys, time
root, go, log = sys.argv[1], sys.argv[2], sys.argv[3]
from datamodules import ShapesDataModule
from datamodules import prepare
build_shapes = prepare.prepare_once
def counted(root_, params, build, **kw):
    def logged(folder):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        build(folder)
    return build_shapes(root_, params, logged, **kw)
prepare.prepare_once = counted
dm = ShapesDataModule(root=root, resolution=16, num_train=300, num_val=32, shard_size=100, batch_size=8, num_workers=0)
while not os.path.exists(go):
    time.sleep(0.01)
dm.prepare_data()
dm.setup("fit")
shards = sorted(os.path.relpath(p, root) for p in __import__("glob").glob(os.path.join(root, "*", "*.tar")))
digest = hashlib.sha256(b"".join(open(os.path.join(root, p), "rb").read() for p in shards)).hexdigest()
batch = next(iter(dm.val_dataloader()))
print(json.dumps({"shards": shards, "digest": digest, "val_keys": batch["key"]}))
"""


def test_three_processes_prepare_the_shapes_data_at_once_into_one_set_of_shards(tmp_path):
    root, go, log = tmp_path / "data" / "shapes16", tmp_path / "go", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(go), str(log)], env=ENV, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    time.sleep(1.0)  # all three imported and waiting
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len(log.read_text().split()) == 1  # rendered once, by one process
    assert results[0] == results[1] == results[2]  # every process reads the same data
    assert len(results[0]["shards"]) == 4  # 3 train + 1 val shards, whole
    assert sorted(os.listdir(root)) == ["heldout.jsonl", "manifest.json", "train", "val"]
    assert os.listdir(tmp_path / "data") == ["shapes16"]  # no claim file, no temporary folder left


def _build_counting(log):
    def build(folder):
        os.makedirs(folder)
        with open(log, "a") as f:
            f.write("built\n")
        with open(os.path.join(folder, "data.txt"), "w") as f:
            f.write("payload")

    return build


def test_a_claim_left_by_a_dead_process_is_taken_over_and_an_interrupted_build_cleared(tmp_path):
    root, log = str(tmp_path / "ds"), tmp_path / "log"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = root + ".tmp-deadhost-1-abc"
    os.makedirs(leftover)  # the unfinished folder of the dead holder
    with open(root + ".lock", "w") as f:  # the claim of a process of this host that is gone
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "pidns": os.stat("/proc/self/ns/pid").st_ino,
                   "token": "t", "tmp": leftover}, f)  # fmt: skip
    os.makedirs(os.path.join(root, "train"))  # what the code of before wrote before it died (no manifest)
    open(os.path.join(root, "train", "shapes-00000.tar.partial"), "w").close()
    prepare_once(root, {"v": 1}, _build_counting(log), patterns={"train/shapes-*.tar.partial"}, timeout=10)
    assert not os.path.exists(leftover)
    assert read_manifest(root) == {"v": 1} and sorted(os.listdir(root)) == ["data.txt", "manifest.json"]
    assert not os.path.exists(root + ".lock")
    prepare_once(root, {"v": 1}, _build_counting(log), timeout=10)  # complete: not built again
    assert log.read_text().count("built") == 1
    with pytest.raises(FileExistsError, match="other parameters"):
        prepare_once(root, {"v": 2}, _build_counting(log), timeout=10)


@pytest.mark.parametrize("foreign", ["notes.txt", ".notes", "train/laion-00000.tar"])
def test_a_folder_with_foreign_files_is_never_cleared(foreign, tmp_path):
    root = tmp_path / "ds"
    (root / "train").mkdir(parents=True)
    (root / "train" / "shapes-00000.tar").write_text("")
    (root / foreign).write_text("mine")
    with pytest.raises(FileExistsError, match=foreign.replace(".", r"\.")):
        prepare_once(str(root), {"v": 1}, _build_counting(tmp_path / "log"), patterns={"train/shapes-*.tar"},
                     timeout=10)  # fmt: skip
    assert (root / foreign).read_text() == "mine"


def test_a_stale_claim_is_taken_over_by_one_waiter_and_a_live_one_is_never_released_by_another(tmp_path):
    from datamodules.prepare import _Claim, _take_over

    path = str(tmp_path / "ds.lock")
    first = _Claim(path, str(tmp_path / "ds.tmp-a"))
    assert first.acquire() and not _Claim(path, "x").acquire()
    judged = json.load(open(path))
    assert _take_over(path, judged) and not _take_over(path, judged)  # the second waiter finds nothing
    second = _Claim(path, str(tmp_path / "ds.tmp-b"))
    assert second.acquire()
    assert not _take_over(path, judged)  # a waiter that judged the old claim leaves the new one
    first.release()  # not the holder any more: releases nothing
    assert second.owned()


def test_a_symlinked_root_gets_the_data_where_it_points(tmp_path):
    target = tmp_path / "scratch" / "shapes"
    target.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    os.symlink(target, tmp_path / "data" / "shapes")
    prepare_once(str(tmp_path / "data" / "shapes"), {"v": 1}, _build_counting(tmp_path / "log"), timeout=10)
    assert read_manifest(str(target)) == {"v": 1} and os.path.islink(tmp_path / "data" / "shapes")


def test_waiting_for_a_live_claim_times_out_naming_the_claim_file(tmp_path):
    root = str(tmp_path / "ds")
    with open(root + ".lock", "w") as f:  # held by this (live) process, fresh
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    with pytest.raises(TimeoutError, match=r"ds\.lock.*delete"):
        prepare_once(root, {"v": 1}, _build_counting(tmp_path / "log"), timeout=0.5, stale_after=60)
    assert not os.path.exists(root)


# ------------------------------------------------------------------------- checkpoints


def _tiny_fit(runs, *extra):
    return ["fit", "--config", TINY, "--data", os.path.join(ROOT, "configs", "data", "shapes16.yaml"),
            "--data.init_args.num_train", "600", "--data.init_args.num_val", "64", "--data.init_args.shard_size", "100",
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8",
            "--trainer.default_root_dir", runs, *extra]  # fmt: skip


def _step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _epoch(path):
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def test_a_save_last_checkpoint_that_never_saved_does_not_write_a_second_last_file(tmp_path):
    """Lightning's ModelCheckpoint(save_last=True) saves at the end of training when it has not
    saved yet; after SaveLastCheckpoint wrote last.ckpt it neither writes it again nor last-v1.ckpt."""
    import lightning as L
    from tiny_module import TinyRegression
    from torch.utils.data import DataLoader

    from callbacks.stopping import SaveLastCheckpoint
    from networks.text_encoders import TransformerTextEncoder

    batch = {"image": torch.zeros(2, 3, 16, 16), "caption": ["a", "b"]}
    model = TinyRegression(TransformerTextEncoder(width=16, depth=1, heads=2, tokenizer="byte"))
    folder = tmp_path / "checkpoints"
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1000)
    L.Trainer(max_steps=3, callbacks=[every, SaveLastCheckpoint()], logger=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
              ).fit(model, DataLoader([batch] * 10, batch_size=None))  # fmt: skip
    assert os.listdir(folder) == ["last.ckpt"] and _step(folder / "last.ckpt") == 3


def test_wrapped_checkpoint_io_writes_atomically_too():
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from callbacks.checkpoint_io import use_atomic_checkpoint_io

    plain = SingleDeviceStrategy("cpu", checkpoint_io=TorchCheckpointIO())
    wrapped = SingleDeviceStrategy("cpu", checkpoint_io=AsyncCheckpointIO(TorchCheckpointIO()))
    assert use_atomic_checkpoint_io(plain) and type(plain.checkpoint_io) is AtomicCheckpointIO
    assert use_atomic_checkpoint_io(wrapped) and type(wrapped.checkpoint_io.checkpoint_io) is AtomicCheckpointIO


def test_fit_without_validation_ends_with_a_last_ckpt_that_ckpt_path_last_continues(shapes16, tmp_path):
    """No validation, with no callback in the config (train.py adds SaveLastCheckpoint) and with the
    CPU trainer config (ModelCheckpoints that monitor a validation metric): the run still ends
    with last.ckpt, and ``--ckpt_path last`` (the summary's continue command) resumes it at step 2."""
    runs = str(tmp_path / "runs")
    cpu = ["--trainer", os.path.join(ROOT, "configs", "trainer", "cpu.yaml")]
    for trainer in ([], cpu):
        args = ["fit", *trainer, *_tiny_fit(runs, "--data.init_args.root", shapes16, "--trainer.limit_val_batches",
                                            "0", "--trainer.enable_progress_bar", "false")[1:],
                ]  # fmt: skip
        name = "noval" + str(len(trainer))
        first = run_cli([*args, "--trainer.max_steps", "2", "--run_name", name], tmp_path)
        last = os.path.join(runs, name, "checkpoints", "last.ckpt")  # also with Lightning's default checkpoint
        assert _step(last) == 2 and _epoch(last) == 0  # saved inside its epoch, so a resume continues it
        if trainer:  # with the run summary of the trainer config: its command continues
            again = re.search(r"continue training: python train.py (.*)", first.stdout).group(1)
            assert "--ckpt_path last" in again and "--trainer.max_steps 4" in again
            resumed = run_cli([*shlex.split(again)], tmp_path)
        else:
            resumed = run_cli([*args, "--trainer.max_steps", "4", "--run_name", name, "--ckpt_path", "last"], tmp_path)
        assert f"Restored all states from the checkpoint at {last}" in resumed.stdout + resumed.stderr
        assert _step(last) == 4 and _epoch(last) == 0  # 200 batches an epoch: still the first
        if trainer:  # its two ModelCheckpoints (best by val/loss, latest as last.ckpt) wrote nothing else
            assert os.listdir(os.path.dirname(last)) == ["last.ckpt"]


def _fails_in_one_line(args, cwd):
    proc = run_cli(args, cwd, expect_failure=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_ckpt_path_last_with_nothing_to_resume_is_a_one_line_error_naming_the_run(shapes16, tmp_path):
    runs = str(tmp_path / "runs")
    error = _fails_in_one_line(_tiny_fit(runs, "--data.init_args.root", shapes16, "--run_name", "fresh",
                                         "--ckpt_path", "last"), tmp_path)  # fmt: skip
    assert "nothing to resume in" in error and os.path.join(runs, "fresh") in error
    assert "leave out --ckpt_path" in error
    assert not glob.glob(os.path.join(runs, "fresh", "**", "*.ckpt"), recursive=True)  # no training


def test_a_truncated_checkpoint_is_a_one_line_error_naming_the_file(shapes16, tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}, "global_step": 3}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert checkpoint_problem(str(good)) is None and "truncated" in checkpoint_problem(str(truncated))
    for sub in ("fit", "predict"):
        args = _tiny_fit(str(tmp_path / "runs"), "--data.init_args.root", shapes16, "--ckpt_path", str(truncated))
        error = _fails_in_one_line([sub, *args[1:]], tmp_path)
        assert str(truncated) in error and "truncated" in error


def _failing_save(after_bytes):
    """torch.save that writes part of the checkpoint to its target, then fails (a kill mid-write)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()[:after_bytes]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data)
        else:
            f.write(data)
        raise OSError("killed mid-write")

    return save


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoints" / "last.ckpt")
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"global_step": 1, "w": torch.arange(10_000)}, path)
    monkeypatch.setattr(torch, "save", _failing_save(after_bytes=5_000))
    with pytest.raises(OSError, match="killed"):
        io_plugin.save_checkpoint({"global_step": 2, "w": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    previous = torch.load(path, weights_only=False)
    assert previous["global_step"] == 1 and torch.equal(previous["w"], torch.arange(10_000))
    assert os.listdir(tmp_path / "checkpoints") == ["last.ckpt"]  # the partial file is gone too


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    """A real SIGKILL in the middle of the write (after part of the bytes reached the disk)."""
    path = str(tmp_path / "last.ckpt")
    atomic_torch_save({"global_step": 1}, path)
    script = (
        "import io, os, signal, sys, torch\n"
        "from callbacks.checkpoint_io import atomic_torch_save\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    b = io.BytesIO(); real(obj, b); f.write(b.getvalue()[:4096]); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = save\n"
        "atomic_torch_save({'global_step': 2, 'w': torch.zeros(100_000)}, sys.argv[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, path], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert checkpoint_problem(path) is None
    left = remove_partial_writes(str(tmp_path))  # what the next run's start removes
    assert len(left) == 1 and os.listdir(tmp_path) == ["last.ckpt"]


def test_train_writes_checkpoints_through_the_atomic_checkpoint_io(shapes16, tmp_path, monkeypatch):
    """The CLI's trainer (built in this process, not run) saves through AtomicCheckpointIO."""
    import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(train.RUN_DIR_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    args = _tiny_fit(str(tmp_path / "runs"), "--data.init_args.root", shapes16, "--run_name", "x")
    cli = train.TextToImageCLI(parser_class=train.Parser, save_config_callback=train.SaveAndLogConfig,
                               save_config_kwargs={"overwrite": True}, subclass_mode_model=True,
                               subclass_mode_data=True, auto_configure_optimizers=False, args=args[1:],
                               run=False)  # fmt: skip
    monkeypatch.delenv(train.RUN_DIR_ENV, raising=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


# ------------------------------------------------------------------------- skip counts under DDP


def _shard_with_bad_samples(path, good, bad, bad_members):
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(png, format="PNG")
    with tarfile.open(path, "w") as tar:
        for i in range(good + bad):
            members = {"png": png.getvalue(), "txt": b"a red square"} if i % (good // bad + 1) else bad_members
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_skip_counts_in_a_checkpoint_are_the_sum_over_ddp_ranks_and_survive_a_resume(tmp_path):
    """Rank 0 reads a shard with empty captions, rank 1 one with missing captions: the checkpoint
    holds both ranks' counts (summed and per rank), and after a 2-process resume the saved sum is
    again what the ranks counted together since the run began."""
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard_with_bad_samples(shards / "a-00000.tar", 20, 5, {"png": b"x", "txt": b"   "})  # rank 0: empty_caption
    _shard_with_bad_samples(shards / "a-00001.tar", 20, 5, {"png": b"x"})  # rank 1: no_caption
    run_dir, out = tmp_path / "run", tmp_path / "ranks.json"
    last = run_dir / "checkpoints" / "last.ckpt"
    totals = []
    for steps, resume in ((6, []), (12, ["--resume"])):
        proc = run_processes([sys.executable, os.path.join(ROOT, "tests", "ddp_skips_script.py"), str(shards),
                              str(run_dir), str(out), str(steps), *resume], timeout=150, retries=1,
                             cwd=str(tmp_path), env=ENV)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        ranks = json.loads(out.read_text())["ranks"]
        state = torch.load(last, weights_only=False)["TextImageDataModule"]
        assert state["skipped_train_by_rank"] == ranks
        summed = {}
        for counts in ranks:
            for reason, n in counts.items():
                summed[reason] = summed.get(reason, 0) + n
        assert state["skipped_train"] == summed
        assert set(ranks[0]) == {"empty_caption"} and set(ranks[1]) == {"no_caption"}
        totals.append(summed)
    for reason in totals[0]:  # the resumed run adds to the counts of the first, on each rank
        assert totals[1][reason] > totals[0][reason]

