"""Data prepared on first use, once, whatever the number of processes and nodes.

Every process that needs a dataset calls :func:`prepare_once` with the same folder and
parameters. The first to create the claim file ``<root>.lock`` (an exclusive create, atomic on
local and shared file systems) builds the dataset in a folder of its own beside ``root`` and
renames it into place when complete; the manifest, written last, marks it complete. The others
wait until a complete manifest appears. A claim whose holder died is taken over: its holder
touches it while it builds, so a claim left untouched for ``stale_after`` seconds (or held by a
process of this host that no longer exists) is stale.

This is what lets Lightning call ``prepare_data`` once per node (``prepare_data_per_node=True``,
its default): on node-local disks every node builds its own copy, and on a shared file system
the nodes' local rank zeros agree through the claim, so exactly one copy is built.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable

MANIFEST = "manifest.json"


def read_manifest(root: str) -> dict | None:
    """The manifest of the dataset in ``root``, or None while there is none (or it is unreadable)."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_manifest(root: str, params: dict) -> None:
    """Write ``root/manifest.json`` last, through a temporary file: a reader sees all or nothing."""
    tmp = os.path.join(root, f".{MANIFEST}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(params, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MANIFEST))


def _check_params(root: str, manifest: dict, params: dict) -> None:
    if manifest != params:
        raise FileExistsError(
            f"{root} holds a dataset made with other parameters ({os.path.join(root, MANIFEST)}: {manifest}, "
            f"wanted {params}); choose another root or delete it"
        )


def _claim_holder(claim: str) -> dict:
    try:
        with open(claim) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _is_stale(claim: str, stale_after: float) -> bool:
    try:
        age = time.time() - os.path.getmtime(claim)
    except OSError:
        return False  # gone: not stale, just released
    holder = _claim_holder(claim)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age > stale_after


def _try_claim(claim: str) -> bool:
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
    return True


def _heartbeat(claim: str, every: float) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            try:
                os.utime(claim)
            except OSError:
                return

    thread = threading.Thread(target=beat, name="prepare-claim-heartbeat", daemon=True)
    thread.start()
    return thread, done


def _clear_incomplete(root: str, expected: set[str]) -> None:
    """Remove an incomplete build left in ``root`` (no manifest) by a process that died. Only entries
    a build writes are removed; anything else is the user's, and stops the preparation."""
    if not os.path.lexists(root):
        return
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)  # an empty folder (made ahead by the user or a tool): the build takes its place
        return
    entries = set(os.listdir(root)) if os.path.isdir(root) else {None}
    foreign = sorted(str(e) for e in entries - expected if e is not None and not str(e).startswith(".")) or (
        ["(not a folder)"] if None in entries else []
    )
    if foreign:
        raise FileExistsError(
            f"{root} exists without {MANIFEST} and holds {', '.join(foreign[:5])}: not a dataset this "
            "command made; choose another root or move those files away"
        )
    print(f"removing the incomplete dataset in {root} (no {MANIFEST}; its build was interrupted)", flush=True)
    shutil.rmtree(root)


def prepare_once(
    root: str,
    params: dict,
    build: Callable[[str], None],
    *,
    expected: set[str] | None = None,
    timeout: float = 3600.0,
    stale_after: float = 120.0,
    poll: float = 0.5,
) -> dict:
    """Make sure ``root`` holds the dataset described by ``params``, building it at most once.

    Args:
        root: the dataset's folder.
        params: what the dataset is made from; saved as ``root/manifest.json`` and compared with an
            existing one (a mismatch is an error, never a silent rebuild).
        build: writes the dataset into the folder it is given (not ``root``); the manifest is
            written afterwards by this function.
        expected: names a build writes at the top of its folder; an interrupted old build made of
            these (and no manifest) is cleared, anything else in ``root`` stops with an error.
        timeout: seconds to wait for another process's build before giving up with an error.
        stale_after: seconds without a heartbeat after which another process's claim is stale.
        poll: seconds between looks at the manifest while waiting.

    Returns:
        ``params``, once ``root`` holds the complete dataset.
    """
    root = os.path.normpath(root)
    claim = root + ".lock"
    parent = os.path.dirname(root) or "."
    os.makedirs(parent, exist_ok=True)
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        manifest = read_manifest(root)
        if manifest is not None:
            _check_params(root, manifest, params)
            return params
        if _try_claim(claim):
            break
        if _is_stale(claim, stale_after):
            holder = _claim_holder(claim)
            print(f"taking over the stale claim {claim} (holder {holder or 'unknown'})", flush=True)
            try:
                os.remove(claim)
            except FileNotFoundError:
                pass
            continue
        if time.monotonic() > deadline:
            holder = _claim_holder(claim)
            raise TimeoutError(
                f"waited {timeout:.0f} s for {os.path.join(root, MANIFEST)}: another process "
                f"({holder.get('host', '?')}, pid {holder.get('pid', '?')}) holds {claim} and has not finished. "
                f"Check that it is still running and that {parent} is the same file system on every node; "
                f"if nothing is preparing the data, delete {claim} and start again"
            )
        if not announced:
            holder = _claim_holder(claim)
            print(f"waiting for {root} to be prepared by {holder.get('host', '?')} pid {holder.get('pid', '?')}", flush=True)
            announced = True
        time.sleep(poll)

    thread, done = _heartbeat(claim, every=max(stale_after / 8, 0.05))
    tmp = f"{root}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        manifest = read_manifest(root)  # finished by another process between our look and our claim
        if manifest is not None:
            _check_params(root, manifest, params)
            return params
        _clear_incomplete(root, expected or set())
        build(tmp)
        write_manifest(tmp, params)
        try:
            os.rename(tmp, root)  # the complete dataset appears at once
        except OSError:
            manifest = read_manifest(root)  # another process, which took over a claim it thought stale, was first
            if manifest is None:
                raise
            _check_params(root, manifest, params)
        return params
    finally:
        done.set()
        thread.join()
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.remove(claim)
        except FileNotFoundError:
            pass
