"""Data prepared on first use, once, whatever the number of processes and nodes.

Every process that needs a dataset calls :func:`prepare_once` with the same folder and
parameters. The first to create the claim file ``<root>.lock`` (an exclusive create, atomic on
local and shared file systems) builds the dataset in a folder of its own beside ``root`` and
renames it into place when complete; the manifest, written last, marks it complete. The others
wait until a complete manifest appears.

A claim whose holder died is taken over: the holder touches its claim while it builds, so a claim
whose modification time has not changed for ``stale_after`` seconds (measured on the waiter's own
clock), or whose holder is a process of this host and pid namespace that no longer exists, is
stale. A takeover renames the stale claim away (only one waiter can), checks that it took the
claim it judged stale, and removes the dead holder's unfinished folder. Each claim carries a
random token, and a process only ever releases its own.

This is what lets Lightning call ``prepare_data`` once per node (``prepare_data_per_node=True``,
its default): on node-local disks every node builds its own copy, and on a shared file system
the nodes' local rank zeros agree through the claim, so exactly one copy is built.
"""

from __future__ import annotations

import fnmatch
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
    """Write ``root/manifest.json`` through a temporary file: a reader sees all or nothing."""
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


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _read_claim(claim: str) -> dict | None:
    try:
        with open(claim) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: judged by its age alone


def _holder_is_dead(holder: dict) -> bool:
    """True only when the holder is a process of this host and pid namespace that is gone."""
    if holder.get("host") != socket.gethostname() or holder.get("pidns") != _pid_namespace():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or _pid_namespace() is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Claim:
    """This process's claim on ``<root>.lock``."""

    def __init__(self, path: str, tmp: str):
        self.path, self.tmp, self.token = path, tmp, uuid.uuid4().hex

    def acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                       "token": self.token, "tmp": self.tmp, "since": time.time()}, f)  # fmt: skip
        return True

    def owned(self) -> bool:
        return (_read_claim(self.path) or {}).get("token") == self.token

    def release(self) -> None:
        if self.owned():  # never another process's claim
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def _heartbeat(claim: _Claim, every: float) -> threading.Event:
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            try:
                os.utime(claim.path)
            except OSError:
                continue  # a passing error (NFS ESTALE): beat again next time

    threading.Thread(target=beat, name="prepare-claim-heartbeat", daemon=True).start()
    return done


def _take_over(path: str, judged: dict | None) -> bool:
    """Remove the stale claim at ``path`` if it is still the one judged stale (same token), and
    the unfinished folder of its holder. Only one of several waiters can rename it away."""
    aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # released, or another waiter took it over
    taken = _read_claim(aside) or {}
    if (judged or {}).get("token") != taken.get("token"):  # a fresh claim came in between: put it back
        try:
            os.link(aside, path)  # fails if yet another claim exists: then that one stands
        except OSError:
            pass
        os.remove(aside)
        return False
    os.remove(aside)
    tmp = taken.get("tmp")
    if isinstance(tmp, str) and os.path.basename(tmp).startswith(os.path.basename(path)[: -len(".lock")] + ".tmp-"):
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"took over the stale claim {path} (holder {taken.get('host', '?')} pid {taken.get('pid', '?')})", flush=True)
    return True


def _clear_incomplete(root: str, patterns: set[str]) -> None:
    """Clear an incomplete build left in ``root`` (no manifest) by the code of before builds were
    renamed into place: only when every entry in it is a file a build writes (``patterns``, paths
    relative to ``root``) or a folder of them; anything else is the user's, and stops here."""
    if not os.path.lexists(root):
        return
    if not os.path.isdir(root) or os.path.islink(root):
        raise FileExistsError(f"{root} exists and is not a folder; choose another root or remove it")
    foreign = []
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                foreign.append(rel)
    if foreign:
        raise FileExistsError(
            f"{root} exists without {MANIFEST} and holds {', '.join(sorted(foreign)[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}: not a dataset this command made; choose another root "
            "or move those files away"
        )
    if any(files for _, _, files in os.walk(root)):
        print(f"removing the incomplete dataset in {root} (no {MANIFEST}; its build was interrupted)", flush=True)
    try:
        shutil.rmtree(root)
    except OSError as err:
        raise OSError(
            f"cannot replace {root} ({err.strerror}); if it is a mount point, point the data root at a "
            "folder inside it"
        ) from err


def prepare_once(
    root: str,
    params: dict,
    build: Callable[[str], None],
    *,
    patterns: set[str] | None = None,
    timeout: float = 3600.0,
    stale_after: float = 120.0,
    poll: float = 0.5,
) -> dict:
    """Make sure ``root`` holds the dataset described by ``params``, building it at most once.

    Args:
        root: the dataset's folder (a symbolic link is followed: the data goes where it points).
        params: what the dataset is made from; saved as ``root/manifest.json`` and compared with an
            existing one (a mismatch is an error, never a silent rebuild).
        build: writes the dataset into the folder it is given (not ``root``); the manifest is
            written afterwards by this function.
        patterns: the files a build writes, as glob patterns relative to its folder
            (``train/shapes-*.tar``); an interrupted old build made only of these (and no
            manifest) is cleared, anything else in ``root`` stops with an error.
        timeout: seconds to wait for another process's build before giving up with an error.
        stale_after: seconds without a heartbeat after which another process's claim is stale.
        poll: seconds between looks at the manifest while waiting.

    Returns:
        ``params``, once ``root`` holds the complete dataset.
    """
    root = os.path.realpath(root)
    path = root + ".lock"
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    claim = _Claim(path, f"{root}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    deadline = time.monotonic() + timeout
    seen: tuple | None = None  # (token, mtime) of the other claim and when it was first seen so
    seen_since = 0.0
    announced = False
    while True:
        manifest = read_manifest(root)
        if manifest is not None:
            _check_params(root, manifest, params)
            return params
        if claim.acquire():
            break
        holder = _read_claim(path)
        try:
            mtime = os.path.getmtime(path)
        except OSError:
            continue  # released just now: look again
        now = time.monotonic()
        if seen is None or seen[:2] != ((holder or {}).get("token"), mtime):
            seen, seen_since = ((holder or {}).get("token"), mtime, holder), now
        if (_holder_is_dead(holder or {}) or now - seen_since > stale_after) and _take_over(path, holder):
            seen = None
            continue
        if now > deadline:
            raise TimeoutError(
                f"waited {timeout:.0f} s for {os.path.join(root, MANIFEST)}: another process "
                f"({(holder or {}).get('host', '?')}, pid {(holder or {}).get('pid', '?')}) holds {path} and has "
                f"not finished. Check that it is still running and that {parent} is the same file system on "
                f"every node; if nothing is preparing the data, delete {path} and start again"
            )
        if not announced:
            print(f"waiting for {root} to be prepared by {(holder or {}).get('host', '?')} "
                  f"pid {(holder or {}).get('pid', '?')}", flush=True)  # fmt: skip
            announced = True
        time.sleep(poll)

    done = _heartbeat(claim, every=max(stale_after / 8, 0.05))
    try:
        manifest = read_manifest(root)  # finished by another process between our look and our claim
        if manifest is not None:
            _check_params(root, manifest, params)
            return params
        _clear_incomplete(root, patterns or set())
        build(claim.tmp)
        write_manifest(claim.tmp, params)
        try:
            os.rename(claim.tmp, root)  # the complete dataset appears at once
        except OSError:
            manifest = read_manifest(root)
            if manifest is None:
                raise
            _check_params(root, manifest, params)
        return params
    finally:
        done.set()
        shutil.rmtree(claim.tmp, ignore_errors=True)
        claim.release()
