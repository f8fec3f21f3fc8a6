"""Which CLIP a checkpoint descends from, and whether a judging CLIP shares a method's ancestry.

A CLIP checkpoint records ``clip_lineage`` (``lightning_modules.clip.CLIP``): the ``origin`` drawn
at its fresh start and the checkpoints it was resumed from. A method that builds on a CLIP names
its checkpoint among its init_args or hyperparameters; :func:`clips_used` follows those names to
the CLIPs, and :func:`judge_problems` refuses a judge of the same origin (``evaluate.py`` and the
benchmarks that judge with a CLIP use it). Only checkpoint files are read: no Lightning, no method.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=64)
def _read(path: str, mtime_ns: int, size: int) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: str) -> dict:
    """A checkpoint file's contents, read once per process (keyed on its real path,
    modification time and size, so a file rewritten meanwhile is read again). Callers only read it."""
    st = os.stat(path)
    return _read(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def _hparams(path: str) -> dict:
    try:
        checkpoint = read_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a checkpoint: nothing to follow
        return {}
    hparams = dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    if "image_tower" in hparams and "text_tower" in hparams:
        hparams["__clip_lineage__"] = checkpoint.get("clip_lineage") or {"origin": None}
    return hparams


def is_clip(path: str) -> bool:
    """Whether a file is a CLIP checkpoint (both towers in its hyperparameters)."""
    return "__clip_lineage__" in _hparams(path)


def _strings(value):
    """Every string in nested dicts, lists and tuples."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def checkpoints_named(path: str) -> list[str]:
    """The checkpoint files a checkpoint's hyperparameters name (e.g. a prior's autoencoder)."""
    return [v for v in _strings(_hparams(path)) if v.endswith(".ckpt") and os.path.isfile(v)]


def clips_used(spec: dict, depth: int = 3) -> dict[str, str | None]:
    """``{path: origin}`` of every CLIP checkpoint a method uses (guidance, reranking, a CLIP text
    encoder), found in its ``model.init_args`` or its checkpoint's hyperparameters, following
    checkpoints that name other checkpoints. The method's own checkpoint is not counted."""
    found: dict[str, str | None] = {}

    def follow(values, level):
        for value in _strings(values):
            if level > depth or not value.endswith(".ckpt") or not os.path.isfile(value) or value in found:
                continue
            hparams = _hparams(value)
            if "__clip_lineage__" in hparams:
                found[value] = hparams["__clip_lineage__"].get("origin")
            else:
                follow(hparams, level + 1)

    follow((spec.get("model") or {}).get("init_args") or {}, 1)
    if spec.get("checkpoint") and os.path.isfile(spec["checkpoint"]):
        own = _hparams(spec["checkpoint"])
        if "__clip_lineage__" not in own:
            follow(own, 1)
    return found


def judge_problems(cfg: dict) -> tuple[list[str], list[str]]:
    """Errors for methods whose CLIP shares ancestry with the judging CLIP (the same origin: the
    same file, or resumed or fine-tuned from one start), and notes where it cannot be told."""
    judge = cfg.get("clip")
    if not judge:
        return [], []
    origin = (_hparams(judge).get("__clip_lineage__") or {}).get("origin")
    errors, notes = [], []
    for spec in cfg["methods"]:
        for path, theirs in clips_used(spec).items():
            if os.path.realpath(path) == os.path.realpath(judge) or (origin and theirs == origin):
                errors.append(
                    f"methods[{spec['name']}] uses the CLIP {path}, which shares its ancestry with the judging CLIP "
                    f"{judge} (origin {origin}): a judge must be trained from scratch apart from every CLIP a method "
                    "uses; train one with its own seed and data (configs/clip/), or set clip: null"
                )
            elif origin is None or theirs is None:
                notes.append(
                    f"methods[{spec['name']}]: cannot tell whether its CLIP {path} shares ancestry with the judge "
                    f"{judge}: {'the judge' if origin is None else 'its CLIP'} was trained before lineage was recorded"
                )
    return errors, notes
