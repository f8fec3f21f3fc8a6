"""The synthetic shapes dataset and its analytic scorer.

Scenes of coloured shapes on a plain background, rendered locally and deterministically
from a seed, with plain-English captions and the attributes in ``.json``:

- ``single``: one object with a colour, a shape, a size and a position
  ("a small red circle on the left");
- ``relation``: two objects of different colours and a spatial relation
  ("a blue square to the left of a yellow triangle");
- ``count``: two to four objects of one colour and shape ("three green triangles").

Some single-object attribute combinations (``HELDOUT``) never appear in training data; they
are the held-out prompts that measure compositional generalisation. ``prompt_set`` adds the
evaluation sets in the style of GenEval's categories (``PROMPT_SETS``): two objects, counting,
colour binding and position, each with its own scorer check.

The scorer reads an image back with no learned model: it segments pixels by their nearest
palette colour, labels connected components, explains each one by the renderer's shape whose
template (sized to its area, blurred by up to 2 pixels) fits its soft coverage best, and
measures its size and box centre, then checks each attribute of the prompt. Soft images (a
1-pixel blur, a 2x down- and up-sampling) read the same as sharp ones.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (165, 60, 215),
    "white": (240, 240, 240),
    "orange": (245, 140, 30),  # version 2 on
    "cyan": (40, 200, 210),  # version 2 on
}
BACKGROUND = (40, 40, 40)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.45}  # object extent as a fraction of the image side
POSITIONS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),  # the corners: version 2 on
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
RELATION_EXTENT = 0.3
COUNT_EXTENT = 0.2
SUPERSAMPLE = 4


DATA_VERSION = 2  # the shapes data written by default; version 1 stays readable


@dataclass(frozen=True)
class Vocabulary:
    """The words one version of the data draws from (the renderer and scorer know all of them)."""

    colours: tuple[str, ...]
    positions: tuple[str, ...]
    counts: tuple[int, ...]
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = tuple(SIZES)


VOCABULARIES = {
    1: Vocabulary(tuple(COLOURS)[:6], tuple(POSITIONS)[:5], (2, 3, 4)),
    2: Vocabulary(tuple(COLOURS), tuple(POSITIONS), (2, 3, 4, 5)),
}


def vocabulary(version: int = DATA_VERSION) -> Vocabulary:
    if version not in VOCABULARIES:
        raise ValueError(f"unknown shapes data version {version!r}; the versions are {', '.join(map(str, VOCABULARIES))}")
    return VOCABULARIES[version]


def _single_combos(version: int = DATA_VERSION) -> list[tuple[str, str, str, str]]:
    v = vocabulary(version)
    return list(itertools.product(v.colours, v.shapes, v.sizes, v.positions))


def _is_heldout(colour: str, shape: str, size: str, position: str) -> bool:
    c, s = list(COLOURS).index(colour), SHAPES.index(shape)
    z, p = list(SIZES).index(size), list(POSITIONS).index(position)
    return (c + 2 * s + 3 * z + p) % 7 == 0


# Version 1: single-object combinations that never appear in the training shards (about one in
# seven); the other categories hold nothing out.
HELDOUT: frozenset[tuple[str, str, str, str]] = frozenset(c for c in _single_combos(1) if _is_heldout(*c))


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    cx: float  # box centre, fraction of width
    cy: float  # box centre, fraction of height
    extent: float  # box side, fraction of the image side


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int) -> None:
    half = obj.extent * side / 2
    x0, y0 = obj.cx * side - half, obj.cy * side - half
    x1, y1 = obj.cx * side + half, obj.cy * side + half
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(obj.cx * side, y0), (x1, y1), (x0, y1)], fill=fill)


def render(objects: Sequence[ShapeObject], resolution: int) -> Image.Image:
    """Render objects at ``resolution`` (drawn 4x larger, then box-filtered for smooth edges)."""
    side = resolution * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw(draw, obj, side)
    return img.resize((resolution, resolution), Image.BOX)


def _caption_single(a: dict, rng: np.random.Generator) -> list[str]:
    o, pos = a["objects"][0], POSITION_PHRASES[a["objects"][0]["position"]]
    return [
        f"a {o['size']} {o['colour']} {o['shape']} {pos}",
        f"{pos}, a {o['size']} {o['colour']} {o['shape']}",
    ]


def _a(o: dict) -> str:
    """'a red circle', 'an orange square'."""
    return f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']}"


def _caption_relation(a: dict, rng: np.random.Generator) -> list[str]:
    o1, o2 = a["objects"]
    return [f"{_a(o1)} {RELATIONS[a['relation']]} {_a(o2)}"]


def _caption_count(a: dict, rng: np.random.Generator) -> list[str]:
    o = a["objects"][0]
    return [f"{COUNT_WORDS[a['count']]} {o['colour']} {o['shape']}s"]


def _caption_pair(a: dict, rng: np.random.Generator) -> list[str]:
    o1, o2 = a["objects"]
    return [f"{_a(o1)} and {_a(o2)}"]


_CAPTIONS = {"single": _caption_single, "relation": _caption_relation, "count": _caption_count,
             "two_objects": _caption_pair, "colour_binding": _caption_pair}  # fmt: skip


def caption(attrs: dict, rng: np.random.Generator | None = None) -> list[str]:
    """Plain-English captions for a scene; the first is the canonical one."""
    return _CAPTIONS[attrs["kind"]](attrs, rng or np.random.default_rng(0))


def single_attrs(colour: str, shape: str, size: str, position: str) -> dict:
    return {
        "kind": "single",
        "objects": [{"colour": colour, "shape": shape, "size": size, "position": position}],
        "count": 1,
    }


def _objects_single(a: dict, rng: np.random.Generator) -> list[ShapeObject]:
    o = a["objects"][0]
    cx, cy = POSITIONS[o["position"]]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    extent = SIZES[o["size"]] * rng.uniform(0.92, 1.08)
    return [ShapeObject(o["colour"], o["shape"], cx + jitter[0], cy + jitter[1], extent)]


def _objects_relation(a: dict, rng: np.random.Generator) -> list[ShapeObject]:
    o1, o2 = a["objects"]
    near, far = rng.uniform(0.24, 0.32), rng.uniform(0.68, 0.76)
    side1, side2 = rng.uniform(0.4, 0.6, size=2)
    first, second = {
        "left of": ((near, side1), (far, side2)),
        "right of": ((far, side1), (near, side2)),
        "above": ((side1, near), (side2, far)),
        "below": ((side1, far), (side2, near)),
    }[a["relation"]]
    return [
        ShapeObject(o1["colour"], o1["shape"], *first, RELATION_EXTENT),
        ShapeObject(o2["colour"], o2["shape"], *second, RELATION_EXTENT),
    ]


def _objects_count(a: dict, rng: np.random.Generator) -> list[ShapeObject]:
    o = a["objects"][0]
    slots = [(x, y) for x in (0.2, 0.5, 0.8) for y in (0.2, 0.5, 0.8)]  # a 3x3 grid keeps objects apart
    chosen = rng.choice(len(slots), size=a["count"], replace=False)
    out = []
    for i in chosen:
        jitter = rng.uniform(-0.03, 0.03, size=2)
        out.append(
            ShapeObject(
                o["colour"], o["shape"], slots[i][0] + jitter[0], slots[i][1] + jitter[1], COUNT_EXTENT
            )
        )
    return out


def _objects_pair(a: dict, rng: np.random.Generator) -> list[ShapeObject]:
    """Two objects side by side or one above the other, in either order (the caption says "and")."""
    relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
    return _objects_relation({**a, "relation": relation}, rng)


_LAYOUTS = {"single": _objects_single, "relation": _objects_relation, "count": _objects_count,
            "two_objects": _objects_pair, "colour_binding": _objects_pair}  # fmt: skip


def objects_for(attrs: dict, rng: np.random.Generator) -> list[ShapeObject]:
    return _LAYOUTS[attrs["kind"]](attrs, rng)


def sample_attrs(
    rng: np.random.Generator,
    kinds: dict[str, float] | None = None,
    heldout: str = "exclude",
    version: int = DATA_VERSION,
) -> dict:
    """Draw a random scene's attributes from the vocabulary of data ``version``.

    ``heldout``: ``exclude`` never draws a held-out combination of any category (training data),
    ``only`` draws only held-out single-object combinations, ``any`` ignores the split.
    """
    v = vocabulary(version)
    kinds = kinds or {"single": 0.6, "relation": 0.25, "count": 0.15}
    names = list(kinds)
    probs = np.asarray([kinds[k] for k in names], dtype=float)
    kind = names[rng.choice(len(names), p=probs / probs.sum())]
    if kind == "single":
        combos = _single_combos(version)
        held = _held_out("single", version)
        if heldout == "exclude":
            combos = [c for c in combos if c not in held]
        elif heldout == "only":
            combos = sorted(held)
        return single_attrs(*combos[rng.integers(len(combos))])
    colours = list(v.colours)
    if kind == "relation":
        while True:  # version 2 holds out some two-object scenes: draw again until one is allowed
            c1, c2 = rng.choice(len(colours), size=2, replace=False)
            s1, s2 = rng.integers(len(SHAPES), size=2)
            rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
            attrs = {
                "kind": "relation",
                "objects": [
                    {"colour": colours[c1], "shape": SHAPES[s1]},
                    {"colour": colours[c2], "shape": SHAPES[s2]},
                ],
                "relation": rel,
                "count": 2,
            }
            if heldout != "exclude" or not held_out_scene(attrs, version):
                return attrs
    if version == 1:  # version 1's draw, kept so that its shards stay byte for byte the same
        n = int(rng.integers(2, 5))
        colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
    else:
        combos = list(itertools.product(v.counts, v.shapes, v.colours))
        if heldout == "exclude":
            combos = [c for c in combos if c not in _held_out("counting", version)]
        n, shape, colour = combos[rng.integers(len(combos))]
    return {"kind": "count", "objects": [{"colour": colour, "shape": shape}], "count": int(n)}


def make_sample(rng: np.random.Generator, resolution: int, **kw) -> tuple[Image.Image, list[str], dict]:
    attrs = sample_attrs(rng, **kw)
    return render(objects_for(attrs, rng), resolution), caption(attrs, rng), attrs


# ----------------------------------------------------------------------------- held-out combinations

HELDOUT_PARTS = ("all", "val", "test")
# Evaluation prompt sets in the style of GenEval's categories, each with its own scorer check.
# Version 2 holds combinations of every category out of training, in two disjoint parts:
# ``val`` (checkpoint selection, the in-training score) and ``test`` (reported tables only).
# Version 1 held out single objects only; its other sets are fresh scenes of training templates.
PROMPT_SETS = {
    "single": "held-out single objects: colour, shape, size and position, never seen in training",
    "two_objects": "'a red circle and a blue square': both shapes there, and nothing else (colours not judged)",
    "counting": "'three green triangles': two to five objects of one colour and shape",
    "colour_binding": "'a red circle and a blue square': each shape in its own colour, two objects",
    "position": "'a red circle to the left of a blue square' / 'above': the relation, shapes and colours",
}
# What version 2 holds out of training, per set, and how much of it: (test, val) as shares of the
# set's combinations (colour_binding: numbers of colour-shape pairings).
HELDOUT_UNITS = {
    "single": "(colour, shape, size, position) of a single object",
    "counting": "(count, shape, colour)",
    "colour_binding": "a colour-shape pairing ('red triangle') inside any two-object scene",
    "two_objects": "an unordered pair of objects ('red circle' + 'blue square') in one scene",
    "position": "(object, relation, object), in either spelling ('A left of B' = 'B right of A')",
}
_HOLDOUT_SHARE = {"single": (1 / 4, 1 / 8), "counting": (1 / 3, 1 / 6), "colour_binding": (4, 2),
                  "two_objects": (1 / 4, 1 / 8), "position": (1 / 4, 1 / 8)}  # fmt: skip
_CANONICAL = {"left of": ("left of", False), "right of": ("left of", True), "above": ("above", False), "below": ("above", True)}


def _split(units: list, name: str) -> dict[str, frozenset]:
    """A fixed random ``test`` and ``val`` share of ``units`` (sorted), the same on every machine."""
    order = np.random.default_rng([2, list(PROMPT_SETS).index(name)]).permutation(len(units))
    n_test, n_val = (round(x * len(units)) if isinstance(x, float) else x for x in _HOLDOUT_SHARE[name])
    return {"test": frozenset(units[i] for i in order[:n_test]),
            "val": frozenset(units[i] for i in order[n_test : n_test + n_val])}  # fmt: skip


def _pair(o1: tuple, o2: tuple) -> tuple:
    return tuple(sorted((o1, o2)))


def relation_unit(attrs: dict) -> tuple:
    """``((colour, shape), relation, (colour, shape))`` spelt with ``left of`` or ``above``."""
    (a, b), (rel, swap) = attrs["objects"], _CANONICAL[attrs["relation"]]
    o1, o2 = (b, a) if swap else (a, b)
    return (o1["colour"], o1["shape"]), rel, (o2["colour"], o2["shape"])


@functools.cache
def heldout_units(version: int = DATA_VERSION) -> dict[str, dict[str, frozenset]]:
    """``{set: {"val": combinations, "test": combinations}}`` held out of the training data (see
    ``HELDOUT_UNITS``). Two-object sets nest: a two_objects pair contains no held-out pairing, and
    a position scene neither; its object pair is not a held-out one either."""
    if version == 1:
        ordered = sorted(HELDOUT)
        return {"single": {"val": frozenset(ordered[0::2]), "test": frozenset(ordered[1::2])}}
    v = vocabulary(version)
    objects = [(c, s) for c in v.colours for s in v.shapes]
    out = {"single": _split(sorted(_single_combos(version)), "single"),
           "counting": _split(sorted(itertools.product(v.counts, v.shapes, v.colours)), "counting"),
           "colour_binding": _split(objects, "colour_binding")}  # fmt: skip
    bound = out["colour_binding"]["val"] | out["colour_binding"]["test"]
    free = [o for o in objects if o not in bound]
    pairs = sorted({_pair(a, b) for a in free for b in free if a[0] != b[0]})  # two colours, any shapes
    out["two_objects"] = _split(pairs, "two_objects")
    taken = out["two_objects"]["val"] | out["two_objects"]["test"]
    scenes = [(a, rel, b) for a in free for b in free for rel in ("left of", "above")
              if a[0] != b[0] and _pair(a, b) not in taken]  # fmt: skip
    out["position"] = _split(sorted(scenes), "position")
    return out


def _held_out(name: str, version: int) -> frozenset:
    parts = heldout_units(version).get(name, {})
    return frozenset().union(*parts.values())


def held_out_scene(attrs: dict, version: int = DATA_VERSION) -> bool:
    """Whether a training scene would contain a held-out combination (of either part)."""
    kind, objects = attrs["kind"], [(o["colour"], o["shape"]) for o in attrs["objects"]]
    if kind == "single":
        o = attrs["objects"][0]
        return (o["colour"], o["shape"], o["size"], o["position"]) in _held_out("single", version)
    if kind == "count":
        return (attrs["count"], objects[0][1], objects[0][0]) in _held_out("counting", version)
    return (
        any(o in _held_out("colour_binding", version) for o in objects)
        or _pair(*objects) in _held_out("two_objects", version)
        or (kind == "relation" and relation_unit(attrs) in _held_out("position", version))
    )


def _two(kind: str, a: tuple, b: tuple, **extra) -> dict:
    objects = [{"colour": a[0], "shape": a[1]}, {"colour": b[0], "shape": b[1]}]
    return {"kind": kind, "objects": objects, "count": 2, **extra}


def _heldout_attrs(name: str, part: str, version: int) -> list[dict]:
    """Every held-out prompt of set ``name`` in ``part`` (``val``, ``test`` or ``all``), in a fixed order."""
    if part not in HELDOUT_PARTS:
        raise ValueError(f"unknown held-out part {part!r}; choose one of {', '.join(HELDOUT_PARTS)}")
    units = heldout_units(version)
    if name not in units:
        raise ValueError(f"shapes data version {version} holds no {name!r} prompts out; version 2 does")
    chosen = sorted(units[name]["val"] | units[name]["test"]) if part == "all" else sorted(units[name][part])
    order = np.random.default_rng([3, list(PROMPT_SETS).index(name)])  # which object is named first
    if name == "single":
        return [single_attrs(*u) for u in chosen]
    if name == "counting":
        return [{"kind": "count", "objects": [{"colour": c, "shape": s}], "count": n} for n, s, c in chosen]
    if name == "position":
        return [_two("relation", a, b, relation=rel) for a, rel, b in chosen]
    if name == "two_objects":
        return [_two(name, *(u if order.random() < 0.5 else u[::-1])) for u in chosen]
    # colour_binding: two objects of different colours and shapes, one or both of them a held-out
    # pairing of this part and neither a pairing of the other part
    v, other = vocabulary(version), {"val": units[name]["test"], "test": units[name]["val"]}.get(part, frozenset())
    objects = [(c, s) for c in v.colours for s in v.shapes if (c, s) not in other]
    pairs = sorted({_pair(a, b) for a in objects for b in objects
                    if a[0] != b[0] and a[1] != b[1] and (a in chosen or b in chosen)})  # fmt: skip
    return [_two(name, *(p if order.random() < 0.5 else p[::-1])) for p in pairs]


def heldout_prompts(part: str = "all", version: int = DATA_VERSION) -> list[tuple[str, dict]]:
    """The held-out single-object prompts of ``part`` as ``(caption, attrs)``, in a fixed order:
    ``val`` and ``test`` are disjoint; compare and select on ``val``, report on ``test``."""
    return [(caption(a)[0], a) for a in _heldout_attrs("single", part, version)]


def _pair_scene(rng: np.random.Generator, kind: str, version: int) -> dict:
    colours = list(vocabulary(version).colours)
    c1, c2 = rng.choice(len(colours), size=2, replace=False)
    s1, s2 = rng.choice(len(SHAPES), size=2, replace=False)  # two different shapes
    return _two(kind, (colours[c1], SHAPES[s1]), (colours[c2], SHAPES[s2]))


def _fresh(name: str, n: int, seed: int, version: int) -> list[tuple[str, dict]]:
    """``n`` distinct prompts of set ``name`` drawn from the whole vocabulary (held out or not)."""
    rng = np.random.default_rng([seed, list(PROMPT_SETS).index(name)])
    out: dict[str, dict] = {}
    for _ in range(100 * n):
        if len(out) == n:
            break
        if name == "single":
            a = sample_attrs(rng, kinds={"single": 1.0}, heldout="any", version=version)
        elif name == "counting":
            a = sample_attrs(rng, kinds={"count": 1.0}, heldout="any", version=version)
        elif name == "position":
            a = sample_attrs(rng, kinds={"relation": 1.0}, heldout="any", version=version)
            a["relation"] = ("left of", "above")[int(rng.integers(2))]
        else:
            a = _pair_scene(rng, name, version)
        out.setdefault(caption(a)[0], a)
    return list(out.items())


def prompt_set(
    name: str, n: int | None = None, seed: int = 0, part: str = "test", version: int = DATA_VERSION
) -> list[tuple[str, dict]]:
    """Up to ``n`` distinct prompts of the set ``name`` (see ``PROMPT_SETS``) as ``(caption, attrs)``:
    the held-out prompts of ``part`` (all of them when ``n`` is None or larger), in an order fixed
    by ``seed``. ``part="any"`` draws ``n`` fresh prompts from the whole vocabulary (R-precision's
    candidates). Version 1 holds only single objects out: its other sets are always fresh."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; the sets are {', '.join(PROMPT_SETS)}")
    if part == "any" or name not in heldout_units(version):
        return _fresh(name, n or 200, seed, version)
    attrs = _heldout_attrs(name, part, version)
    order = np.random.default_rng([seed, 0]).permutation(len(attrs))[:n]
    return [(caption(attrs[i])[0], attrs[i]) for i in order]


_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def scene_key(attrs: dict) -> tuple:
    """What a prompt says about a scene, in a canonical form: two prompts with the same key are
    true of the same images ("a red circle and a blue square" and "a blue square and a red
    circle"; "A to the left of B" and "B to the right of A")."""
    kind = attrs["kind"]

    def obj(o: dict) -> tuple:
        return tuple(sorted(o.items()))

    if kind == "relation":
        (o1, o2), rel = attrs["objects"], attrs["relation"]
        return kind, min((obj(o1), rel, obj(o2)), (obj(o2), _MIRROR[rel], obj(o1)))
    if kind == "count":
        return kind, attrs["count"], obj(attrs["objects"][0])
    return kind, tuple(sorted(obj(o) for o in attrs["objects"]))


# ----------------------------------------------------------------------------- scorer


@dataclass
class Blob:
    colour: str
    area: float  # fraction of the image (soft coverage)
    cx: float
    cy: float
    extent: float  # the fitted shape's box side, fraction of the image side
    shape: str  # the renderer's shape that explains the blob best
    softness: float = 0.0  # the fitted blur, pixels (0: as sharp as a render)
    misfit: float = 0.0  # the best template's squared error over the blob's area


_PALETTE = np.asarray([BACKGROUND, *COLOURS.values()], dtype=np.float32)
_NAMES = ["background", *COLOURS]
SCORER_VERSION = 3  # 1: fill ratio of the soft box; 2: shape templates fitted with a blur; 3: 2 with 8 colours, a soft edge by its nearest mix
_SOFTNESS = (0.0, 0.5, 1.0, 1.5, 2.0)  # the blurs (Gaussian sigma, pixels) a fitted template may have
_SUB = 4  # template supersampling, as the renderer's
# The worst misfit a region may have and still be a shape: softened renders stay under 0.05 at
# 32 px (under 0.14 at 16 px), a ring, a 2:1 bar or an upside-down triangle are 0.18 and more.
# Regions under 30 pixels of area are pixelated and get more room (a 16 px render: up to 0.31).
_MAX_MISFIT, _MAX_MISFIT_SMALL = 0.15, 0.35
_MIX_TOLERANCE = 40.0  # RGB distance from the background-to-colour line that still counts as a mix


def to_uint8(image) -> np.ndarray:
    """(3, h, w) tensor in [-1, 1], or (h, w, 3) uint8 array / PIL image -> (h, w, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):
        arr = (
            image.detach()
            .float()
            .cpu()
            .clamp(-1, 1)
            .add(1)
            .mul(127.5)
            .round()
            .byte()
            .permute(1, 2, 0)
            .numpy()
        )
        return arr
    return np.asarray(image, dtype=np.uint8)


def _template(shape: str, side: float, cx: float, cy: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The renderer's coverage of one shape (box side ``side`` and box centre in pixels) on the
    pixels ``ys`` x ``xs`` (a patch), by supersampling."""
    offsets = (np.arange(_SUB) + 0.5) / _SUB
    y = (ys[:, None] + offsets[None, :]).reshape(-1)[:, None]  # (h * SUB, 1) sub-pixel centres
    x = (xs[:, None] + offsets[None, :]).reshape(-1)[None, :]
    half = side / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # apex at the top centre, base along the bottom of the box
        top = cy - half
        inside = (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    return inside.reshape(len(ys), _SUB, len(xs), _SUB).mean(axis=(1, 3))


_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # shape area / box area


def _half(x: np.ndarray, axis: int) -> np.ndarray:
    """Down-sampling by 2 (bilinear with antialiasing, as torch's) along ``axis``, even length."""
    x = np.moveaxis(x, axis, 0)
    p = np.concatenate([x[:1], x, x[-1:]], 0)
    return np.moveaxis((p[0:-2:2] + 3 * p[1:-1:2] + 3 * p[2::2] + p[3::2]) / 8, 0, axis)


def _double(y: np.ndarray, axis: int) -> np.ndarray:
    """Bilinear up-sampling by 2 along ``axis`` (torch's, corners not aligned)."""
    y = np.moveaxis(y, axis, 0)
    p = np.concatenate([y[:1], y, y[-1:]], 0)
    z = np.empty((2 * len(y), *y.shape[1:]))
    z[0::2], z[1::2] = 0.25 * p[:-2] + 0.75 * p[1:-1], 0.75 * p[1:-1] + 0.25 * p[2:]
    return np.moveaxis(z, 0, axis)


def _softened(sharp: np.ndarray, even: bool) -> list[tuple[float, np.ndarray]]:
    """A template under each blur the scorer allows: Gaussians of ``_SOFTNESS`` pixels, and (on a
    patch that starts at even pixels) a render at half the resolution up-sampled 2x, which is
    how a half-resolution method is compared (-1 as its softness)."""
    out = [(s, ndimage.gaussian_filter(sharp, s, mode="constant") if s else sharp) for s in _SOFTNESS]
    if even and sharp.shape[0] % 2 == 0 and sharp.shape[1] % 2 == 0:
        out.append((-1.0, _double(_double(_half(_half(sharp, 0), 1), 0), 1)))
    return out


def _fit_shape(alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[str, float, float, float]:
    """The shape (circle, square, triangle), box side (pixels) and blur that best explain a blob's
    soft coverage ``alpha`` on a patch: each shape is sized to the blob's area (which a blur
    keeps), placed at its centroid, blurred by each of ``_softened`` and compared pixel by pixel;
    the last is the misfit: the squared error over the blob's area."""
    total = alpha.sum()
    my = (alpha.sum(1) @ (ys + 0.5)) / total
    mx = (alpha.sum(0) @ (xs + 0.5)) / total
    best = (np.inf, "circle", 0.0, 0.0)
    for shape, fraction in _AREA.items():
        side = float(np.sqrt(total / fraction))
        cy = my - side / 6 if shape == "triangle" else my  # a triangle's centroid is 2/3 down its box
        sharp = _template(shape, side, mx, cy, ys, xs)
        for sigma, t in _softened(sharp, even=ys[0] % 2 == 0 and xs[0] % 2 == 0):
            err = float(((t - alpha) ** 2).sum())
            if err < best[0]:
                best = (err, shape, side, sigma)
    return best[1], best[2], best[3], best[0] / max(float(total), 1e-6)


def _split_touching(mask: np.ndarray, alpha: np.ndarray, core: float = 0.75) -> tuple[np.ndarray, int]:
    """Connected regions of ``mask``, with a region that holds several separate cores (pixels
    covered at least ``core``) split between them, each pixel to its nearest core: two objects
    that a blur has joined across a narrow gap count as two."""
    components, n = ndimage.label(mask)
    cores, m = ndimage.label(mask & (alpha >= core))
    if m <= n:  # at most one core per region (a region may have none)
        return components, n
    nearest = cores[tuple(ndimage.distance_transform_edt(cores == 0, return_indices=True)[1])]
    out, count = np.zeros_like(components), 0
    for comp in range(1, n + 1):
        region = components == comp
        inside = np.unique(cores[region & (cores > 0)])
        if len(inside) <= 1:
            count += 1
            out[region] = count
            continue
        for c in inside:
            count += 1
            out[region & (nearest == c)] = count
    return out, count


def find_blobs(image, max_distance: float = 90.0, min_area: float = 0.006, reach: int = 3) -> list[Blob]:
    """Connected regions of each palette colour, largest first.

    A pixel is the colour whose mix with the background it is nearest (within ``_MIX_TOLERANCE``)
    when it is more than half that colour, or else the palette colour it is nearest to (within
    ``max_distance``): a soft edge stays its object's colour. Each region's soft coverage (each pixel's
    position between the background and the region's colour, on the pixels within ``reach`` of
    it that are nearer to it than to another region of its colour) is explained by the
    renderer's shapes: the one whose template, sized to the coverage's area, placed at its
    centroid and softened as ``_softened`` allows, is nearest. A blur keeps the area and the
    centroid, so a soft image reads as a sharp one (scorer version 2; version 1 compared the
    area with the soft box, which a blur inflates).
    """
    arr = to_uint8(image).astype(np.float32)
    h, w, _ = arr.shape
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (h, w, k)
    label = dist.argmin(-1)
    label[dist.min(-1) > max_distance] = 0
    offset = arr - _PALETTE[0]
    directions = _PALETTE[1:] - _PALETTE[0]  # (k - 1, 3): background to each colour
    alphas = np.clip(offset @ directions.T / (directions**2).sum(1), 0.0, 1.0)  # (h, w, k - 1) coverage
    residual = np.linalg.norm(offset[..., None, :] - alphas[..., None] * directions, axis=-1)
    mixes = residual < _MIX_TOLERANCE  # (h, w, k - 1): a mix of the background and each colour
    # a mix of the background and a colour is that colour when more than half covered, even where
    # another colour is nearer (a soft yellow edge is nearer orange than yellow); the mix is the
    # nearest line from the background to a colour (an edge at 0.48 yellow is 0.52 orange, farther)
    line = residual.argmin(-1)
    coverage = np.take_along_axis(alphas, line[..., None], -1)[..., 0]
    soft_edge = (residual.min(-1) < _MIX_TOLERANCE) & (coverage > 0.5)
    label[soft_edge] = line[soft_edge] + 1
    blobs = []
    for idx in range(1, len(_NAMES)):
        alpha = alphas[..., idx - 1]
        components, n = _split_touching(label == idx, alpha)
        if n == 0:
            continue
        mixed = mixes[..., idx - 1]  # at any coverage: an edge pixel may be nearest another colour
        if n > 1:  # each pixel belongs to the nearest region of this colour
            owner = components[tuple(ndimage.distance_transform_edt(components == 0, return_indices=True)[1])]
        else:
            owner = np.ones_like(components)
        for comp in range(1, n + 1):
            mask = components == comp
            ys, xs = np.nonzero(mask)
            if len(xs) / (h * w) < min_area or len(xs) < 3:
                continue
            near = ndimage.binary_dilation(
                mask, structure=np.ones((3, 3), bool), iterations=reach
            )  # a square
            region = near & (owner == comp) & ((label == 0) | mask | mixed)
            y0, y1 = max(ys.min() - reach, 0) // 2 * 2, min(ys.max() + reach + 2, h)  # even starts
            x0, x1 = max(xs.min() - reach, 0) // 2 * 2, min(xs.max() + reach + 2, w)
            y1, x1 = y1 - (y1 - y0) % 2, x1 - (x1 - x0) % 2
            soft = (alpha * region)[y0:y1, x0:x1]
            shape, side, sigma, misfit = _fit_shape(
                soft, np.arange(y0, y1, dtype=np.float64), np.arange(x0, x1, dtype=np.float64)
            )
            if misfit > (_MAX_MISFIT if soft.sum() >= 30 else _MAX_MISFIT_SMALL):
                shape = "unknown"  # no shape explains it (a ring, a bar, a speckle): it matches no prompt
            blobs.append(
                Blob(
                    colour=_NAMES[idx],
                    area=float(soft.sum()) / (h * w),
                    cx=(xs.min() + xs.max() + 1) / 2 / w,
                    cy=(ys.min() + ys.max() + 1) / 2 / h,
                    extent=side / max(h, w),
                    shape=shape,
                    softness=sigma,
                    misfit=misfit,
                )
            )
    return sorted(blobs, key=lambda b: -b.area)


def _largest(blobs: list[Blob], colour: str) -> Blob | None:
    return next((b for b in blobs if b.colour == colour), None)


def score(image, attrs: dict) -> dict[str, bool]:
    """Which attributes of ``attrs`` the image satisfies; ``all`` is their conjunction."""
    blobs = find_blobs(image)
    result: dict[str, bool] = {}
    if attrs["kind"] == "single":
        o = attrs["objects"][0]
        b = _largest(blobs, o["colour"])
        result["colour"] = b is not None
        result["shape"] = b is not None and b.shape == o["shape"]
        result["size"] = b is not None and (b.extent > 0.35) == (o["size"] == "large")
        if b is not None:
            nearest = min(
                POSITIONS, key=lambda p: (POSITIONS[p][0] - b.cx) ** 2 + (POSITIONS[p][1] - b.cy) ** 2
            )
        result["position"] = b is not None and nearest == o["position"]
        result["count"] = len(blobs) == 1
    elif attrs["kind"] == "relation":
        (o1, o2), rel = attrs["objects"], attrs["relation"]
        b1, b2 = _largest(blobs, o1["colour"]), _largest(blobs, o2["colour"])
        result["colour"] = b1 is not None and b2 is not None
        result["shape"] = result["colour"] and b1.shape == o1["shape"] and b2.shape == o2["shape"]
        ok = False
        if result["colour"]:
            dx, dy = b1.cx - b2.cx, b1.cy - b2.cy
            ok = {
                "left of": dx < 0 and abs(dx) > abs(dy),
                "right of": dx > 0 and abs(dx) > abs(dy),
                "above": dy < 0 and abs(dy) > abs(dx),
                "below": dy > 0 and abs(dy) > abs(dx),
            }[rel]
        result["relation"] = ok
        result["count"] = len(blobs) == 2
    elif attrs["kind"] == "two_objects":
        shapes = sorted(b.shape for b in blobs[:2])
        result["shape"] = shapes == sorted(o["shape"] for o in attrs["objects"])
        result["count"] = len(blobs) == 2
    elif attrs["kind"] == "colour_binding":
        found = [_largest(blobs, o["colour"]) for o in attrs["objects"]]
        result["colour"] = all(b is not None for b in found)
        result["shape"] = result["colour"] and all(
            b.shape == o["shape"] for b, o in zip(found, attrs["objects"])
        )
        result["count"] = len(blobs) == 2
    else:
        o = attrs["objects"][0]
        mine = [b for b in blobs if b.colour == o["colour"]]
        result["colour"] = bool(mine)
        result["shape"] = bool(mine) and sum(b.shape == o["shape"] for b in mine) * 2 > len(mine)
        result["count"] = len(mine) == attrs["count"] and len(blobs) == attrs["count"]
    result["all"] = all(result.values())
    return result


def score_batch(images, attrs: Sequence[dict]) -> dict[str, float]:
    """Mean rate of each attribute (over the prompts that have it) and of ``all``."""
    totals: dict[str, list[bool]] = {}
    for img, a in zip(images, attrs):
        for k, v in score(img, a).items():
            totals.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in totals.items()}


# ----------------------------------------------------------------------------- shards

SPLITS = {"train": 0, "val": 1}
# every file a build writes (relative to the root): an interrupted old build made of these is cleared
BUILD_PATTERNS = {f"{split}/shapes-*.tar{end}" for split in SPLITS for end in ("", ".partial")} | {
    "heldout.jsonl"
}


def write_shapes_shards(
    root: str,
    resolution: int = 32,
    num_train: int = 20000,
    num_val: int = 512,
    seed: int = 0,
    shard_size: int = 1000,
    progress: bool = False,
    wait_timeout: float = 3600.0,
    version: int = DATA_VERSION,
) -> dict:
    """Render the dataset into ``root/train`` and ``root/val`` tar shards (PNG + txt + json).

    Deterministic in ``seed`` and ``version`` (see ``VOCABULARIES`` and ``heldout_units``; no
    training or validation scene contains a held-out combination). Writes ``root/heldout.jsonl``
    (every held-out prompt with its set and part) and, last, ``root/manifest.json`` with the
    parameters; a root whose manifest matches is left alone.
    Safe when several processes or nodes call it at once on the same folder: one renders, the
    others wait up to ``wait_timeout`` seconds for its manifest (``datamodules.prepare.prepare_once``).
    """
    vocabulary(version)  # an unknown version stops here
    params = {
        "resolution": resolution,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "shard_size": shard_size,
        "version": version,
    }

    def build(folder: str) -> None:
        from .shards import ShardWriter

        for split, n in (("train", num_train), ("val", num_val)):
            with ShardWriter(os.path.join(folder, split), prefix="shapes", max_count=shard_size) as writer:
                indices = range(n)
                if progress:
                    from tqdm import tqdm

                    indices = tqdm(indices, desc=f"shapes {split}", unit="img")
                for i in indices:
                    rng = np.random.default_rng([seed, SPLITS[split], i])
                    img, caps, attrs = make_sample(rng, resolution, version=version)
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    writer.write(
                        f"{split}{i:08d}", {"png": buf.getvalue(), "txt": "\n".join(caps), "json": attrs}
                    )
        with open(os.path.join(folder, "heldout.jsonl"), "w") as f:
            for name in heldout_units(version):
                for part in ("val", "test"):
                    for cap, attrs in prompt_set(name, part=part, version=version):
                        f.write(json.dumps({"set": name, "part": part, "caption": cap, "attrs": attrs}) + "\n")

    from .prepare import prepare_once

    return prepare_once(root, params, build, patterns=BUILD_PATTERNS, timeout=wait_timeout)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Render the synthetic shapes dataset into tar shards.")
    p.add_argument("root", help="output folder (gets train/, val/, heldout.jsonl, manifest.json)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-val", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--version", type=int, default=DATA_VERSION, choices=sorted(VOCABULARIES))
    a = p.parse_args(argv)
    params = write_shapes_shards(
        a.root, a.resolution, a.num_train, a.num_val, a.seed, a.shard_size, progress=True, version=a.version
    )
    print(f"shapes dataset ready in {a.root}: {params}")


if __name__ == "__main__":
    main()
