"""Descriptive captions and layouts of shapes scenes, read from the scene's ground truth.

``exhaustive_caption`` names every attribute of every object the renderer drew (count, size,
colour, shape, position, and the relation of two objects), and no attribute the scene lacks: the
descriptive recaptioning of DALL-E 3, with the scene's attributes and the renderer's objects in
place of a captioning model. ``parse_exhaustive`` reads such a caption back.

``plan_layout`` is a rule-based layout planner: a prompt (its attributes, or a terse caption) in,
one ``(phrase, box)`` per object out, with boxes ``(x0, y0, x1, y1)`` in [0, 1] placed by the
renderer's own geometry, so that a scene drawn at those boxes satisfies the scorer. ``true_boxes``
gives the boxes of a rendered training scene from its objects (``replay_scene`` rebuilds them
from a shard sample's key), which is where a layout-conditioned method's training layouts come from.

Words for what the attributes leave open follow the scorer's rules: an object's size is
``large`` above an extent of 0.35 of the image side, and its position is the nearest of
``POSITIONS`` to its box centre.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np

from .shapes import (
    COLOURS,
    COUNT_EXTENT,
    COUNT_WORDS,
    DATA_VERSION,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_EXTENT,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    ShapeObject,
    heldout_units,
    objects_for,
    sample_attrs,
)
from .shards import SampleError

LARGE_ABOVE = 0.35  # the scorer's size threshold (extent as a fraction of the image side)
# Where the renderer puts two objects (``_objects_relation``): the middles of its draws of the
# near and far coordinate along the relation's axis, and of the other coordinate.
RELATION_NEAR, RELATION_FAR, RELATION_SIDE = 0.28, 0.72, 0.5
# Count scenes: cells of the renderer's 3x3 grid (``_objects_count``), far apart first.
COUNT_SLOTS = ((0.2, 0.2), (0.8, 0.8), (0.8, 0.2), (0.2, 0.8), (0.5, 0.5))
_TWO_KINDS = ("relation", "two_objects", "colour_binding")


def size_word(extent: float) -> str:
    return "large" if extent > LARGE_ABOVE else "small"


def position_word(cx: float, cy: float) -> str:
    """The nearest named position to a box centre (the scorer's rule)."""
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def relation_word(first: ShapeObject, second: ShapeObject) -> str:
    """How ``first`` lies to ``second``, along the axis of their larger offset (the scorer's rule)."""
    dx, dy = first.cx - second.cx, first.cy - second.cy
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _relation_positions(relation: str) -> tuple[str, str]:
    """Where the renderer puts the first and the second object of a relation scene."""
    return {"left of": ("left", "right"), "right of": ("right", "left"),
            "above": ("top", "bottom"), "below": ("bottom", "top")}[relation]  # fmt: skip


def scene_facts(
    attrs: dict, objects: Sequence[ShapeObject] | None = None, withhold: frozenset = frozenset()
) -> dict:
    """What a scene shows: ``{"count", "objects": [{size?, colour, shape, position?}], "relation"?}``.

    With the renderer's ``objects`` every object has a size and a position read from its box; without
    them only what the attributes fix is there: a relation scene's positions follow its relation,
    a count scene's positions and a two-object prompt's placement are left out. An object of a
    scene with several objects whose ``(colour, shape, size, position)`` is in ``withhold`` (the
    held-out single objects) loses its size, so that no caption of a training scene names a
    held-out combination; a count scene's objects share one size word, and lose it together.
    """
    facts = _facts(attrs, objects)
    objs = facts["objects"]

    def held(o: dict) -> bool:
        return (o["colour"], o["shape"], o["size"], o.get("position")) in withhold

    if facts["count"] > 1 and any(held(o) for o in objs):
        drop = objs if attrs["kind"] == "count" else [o for o in objs if held(o)]
        for o in drop:
            del o["size"]
    return facts


def _facts(attrs: dict, objects: Sequence[ShapeObject] | None) -> dict:
    kind, named = attrs["kind"], attrs["objects"]
    if kind == "single":
        return {"count": 1, "objects": [dict(named[0])]}
    if kind == "count":
        if objects is None:
            return {"count": attrs["count"], "objects": [{"size": size_word(COUNT_EXTENT), **named[0]}]}
        ordered = sorted(objects, key=lambda o: (round(o.cy, 1), o.cx))  # reading order
        return {"count": attrs["count"], "objects": [
            {"size": size_word(o.extent), "colour": o.colour, "shape": o.shape, "position": position_word(o.cx, o.cy)}
            for o in ordered]}  # fmt: skip
    if objects is not None:
        out = [{"size": size_word(o.extent), "colour": o.colour, "shape": o.shape,
                "position": position_word(o.cx, o.cy)} for o in objects]  # fmt: skip
        return {"count": 2, "objects": out, "relation": relation_word(*objects)}
    out = [{"size": size_word(RELATION_EXTENT), **o} for o in named]
    if kind == "relation":
        for o, p in zip(out, _relation_positions(attrs["relation"])):
            o["position"] = p
        return {"count": 2, "objects": out, "relation": attrs["relation"]}
    return {"count": 2, "objects": out}


def exhaustive_caption(
    attrs: dict, objects: Sequence[ShapeObject] | None = None, withhold: frozenset = frozenset()
) -> str:
    """A caption that names every attribute of the scene and nothing else (see ``scene_facts``,
    and ``withhold`` there):

    - ``one small red circle on the left``;
    - ``two objects: a small red circle on the left and a small blue square on the right; the red
      circle is to the left of the blue square``;
    - ``three small green triangles: one at the top left, one in the center and one at the bottom``.
    """
    facts = scene_facts(attrs, objects, withhold)
    objs, n = facts["objects"], facts["count"]

    def where(o: dict) -> str:
        return f" {POSITION_PHRASES[o['position']]}" if "position" in o else ""

    def what(o: dict) -> str:
        return f"{o['size']} {o['colour']} {o['shape']}" if "size" in o else f"{o['colour']} {o['shape']}"

    if n == 1:
        o = objs[0]
        return f"one {what(o)}{where(o)}"
    if attrs["kind"] == "count":
        o = objs[0]
        head = f"{COUNT_WORDS[n]} {what(o)}s"
        if "position" not in o:
            return head
        places = [f"one {POSITION_PHRASES[p['position']]}" for p in objs]
        return f"{head}: {', '.join(places[:-1])} and {places[-1]}"
    a, b = (f"{_article(what(o))} {what(o)}{where(o)}" for o in objs)
    text = f"two objects: {a} and {b}"
    if "relation" in facts:
        (o1, o2), rel = objs, RELATIONS[facts["relation"]]
        text += f"; the {o1['colour']} {o1['shape']} is {rel} the {o2['colour']} {o2['shape']}"
    return text


def _alt(words) -> str:
    return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_SIZE, _COLOUR, _SHAPE = _alt(SIZES), _alt(COLOURS), _alt(SHAPES)
_POS = _alt(POSITION_PHRASES.values())
_REL = _alt(RELATIONS.values())
_NUMBER = _alt(COUNT_WORDS.values())
_PHRASE_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_PHRASE_RELATION = {v: k for k, v in RELATIONS.items()}
_NUMBER_COUNT = {v: k for k, v in COUNT_WORDS.items()}
_OBJ = f"(?:{_SIZE} )?{_COLOUR} {_SHAPE}"  # an exhaustive caption may withhold a size
_SIZED = f"{_SIZE} {_COLOUR} {_SHAPE}"


def parse_exhaustive(text: str) -> dict | None:
    """``exhaustive_caption``'s text back to its facts (``scene_facts``' form), None if it is not one."""

    def obj(size, colour, shape, phrase=None) -> dict:
        o = {"size": size} if size else {}
        o |= {"colour": colour, "shape": shape}
        return o | ({"position": _PHRASE_POSITION[phrase]} if phrase else {})

    if m := re.fullmatch(f"one {_OBJ}(?: {_POS})?", text):
        return {"count": 1, "objects": [obj(*m.groups())]}
    if m := re.fullmatch(f"two objects: an? {_OBJ}(?: {_POS})? and an? {_OBJ}(?: {_POS})?"
                         f"(?:; the {_COLOUR} {_SHAPE} is {_REL} the {_COLOUR} {_SHAPE})?", text):  # fmt: skip
        g = m.groups()
        out = {"count": 2, "objects": [obj(*g[0:4]), obj(*g[4:8])]}
        if g[8] is not None:
            if (g[8], g[9], g[11], g[12]) != tuple(
                out["objects"][i][k] for i in (0, 1) for k in ("colour", "shape")
            ):
                return None  # the relation must be between the two objects, in their order
            out["relation"] = _PHRASE_RELATION[g[10]]
        return out
    if m := re.fullmatch(f"{_NUMBER} {_OBJ}s(?:: (.*))?", text):
        number, size, colour, shape, places = m.groups()
        n = _NUMBER_COUNT[number]
        if places is None:
            return {"count": n, "objects": [obj(size, colour, shape)]}
        found = re.fullmatch(", ".join([f"one {_POS}"] * (n - 1)) + f" and one {_POS}", places)
        if found is None:
            return None
        return {"count": n, "objects": [obj(size, colour, shape, p) for p in found.groups()]}
    return None


def parse_caption(text: str) -> dict | None:
    """A terse caption (``shapes.caption``'s templates) back to the prompt's attributes, None if it
    is not one. "A and B" reads as ``colour_binding`` (each shape in its colour), the stricter of
    the two prompt sets that share the template."""
    if m := re.fullmatch(f"an? {_SIZED} {_POS}", text):
        size, colour, shape, phrase = m.groups()
    elif m := re.fullmatch(f"{_POS}, an? {_SIZED}", text):
        phrase, size, colour, shape = m.groups()
    else:
        phrase = None
    if phrase is not None:
        o = {"colour": colour, "shape": shape, "size": size, "position": _PHRASE_POSITION[phrase]}
        return {"kind": "single", "objects": [o], "count": 1}
    if m := re.fullmatch(f"an? {_COLOUR} {_SHAPE} (?:{_REL}|(and)) an? {_COLOUR} {_SHAPE}", text):
        c1, s1, rel, _, c2, s2 = m.groups()
        objects = [{"colour": c1, "shape": s1}, {"colour": c2, "shape": s2}]
        if rel is None:
            return {"kind": "colour_binding", "objects": objects, "count": 2}
        return {"kind": "relation", "objects": objects, "relation": _PHRASE_RELATION[rel], "count": 2}
    if m := re.fullmatch(f"{_NUMBER} {_COLOUR} {_SHAPE}s", text):
        number, colour, shape = m.groups()
        return {
            "kind": "count",
            "objects": [{"colour": colour, "shape": shape}],
            "count": _NUMBER_COUNT[number],
        }
    return None


# ----------------------------------------------------------------------------- layouts

Box = tuple[float, float, float, float]


def _box(cx: float, cy: float, extent: float) -> Box:
    """The square box of side ``extent`` centred at ``(cx, cy)``, clipped to the image."""
    h = extent / 2
    return (max(cx - h, 0.0), max(cy - h, 0.0), min(cx + h, 1.0), min(cy + h, 1.0))


def _phrase(colour: str, shape: str, size: str | None = None) -> str:
    words = f"{size} {colour}" if size else colour
    return f"{_article(words)} {words} {shape}"


def plan_layout(prompt: dict | str) -> list[tuple[str, Box]]:
    """One ``(phrase, box)`` per object of a prompt (its attributes, or a caption ``parse_caption``
    reads), boxes ``(x0, y0, x1, y1)`` in [0, 1] where the renderer would draw the object: a single
    object at its named position and size, two objects where a relation scene puts them (side by
    side for "A and B"), a count's objects in separate cells of the renderer's 3x3 grid.
    """
    attrs = parse_caption(prompt) if isinstance(prompt, str) else prompt
    if attrs is None:
        raise ValueError(f"no layout for {prompt!r}: not a caption of the shapes templates")
    kind, named = attrs["kind"], attrs["objects"]
    if kind == "single":
        o = named[0]
        return [
            (_phrase(o["colour"], o["shape"], o["size"]), _box(*POSITIONS[o["position"]], SIZES[o["size"]]))
        ]
    if kind == "count":
        o, n = named[0], attrs["count"]
        if n > len(COUNT_SLOTS):
            raise ValueError(f"no layout for {n} objects: the renderer's grid plans up to {len(COUNT_SLOTS)}")
        return [(_phrase(o["colour"], o["shape"]), _box(*c, COUNT_EXTENT)) for c in COUNT_SLOTS[:n]]
    if kind not in _TWO_KINDS:
        raise ValueError(f"no layout for a scene of kind {kind!r}")
    near, far = (RELATION_NEAR, RELATION_SIDE), (RELATION_FAR, RELATION_SIDE)
    centres = {"left of": (near, far), "right of": (far, near),
               "above": (near[::-1], far[::-1]), "below": (far[::-1], near[::-1])}  # fmt: skip
    placed = centres[attrs.get("relation", "left of")]
    return [(_phrase(o["colour"], o["shape"]), _box(*c, RELATION_EXTENT)) for o, c in zip(named, placed)]


def layout_objects(layout: Sequence[tuple[str, Box]]) -> list[ShapeObject]:
    """The renderer's objects for a layout (colour and shape read from each phrase), each filling
    its box: what ``shapes.render`` draws for a planned scene."""
    out = []
    for phrase, (x0, y0, x1, y1) in layout:
        words = phrase.split()
        colour = next(w for w in words if w in COLOURS)
        shape = next(w for w in words if w in SHAPES)
        out.append(ShapeObject(colour, shape, (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)))
    return out


def true_boxes(objects: Sequence[ShapeObject]) -> list[tuple[str, Box]]:
    """The ``(phrase, box)`` of each object the renderer drew (clipped to the image): a training
    scene's layout."""
    return [(_phrase(o.colour, o.shape, size_word(o.extent)), _box(o.cx, o.cy, o.extent)) for o in objects]


def replay_scene(key: str, seed: int, version: int) -> tuple[dict, list[ShapeObject]]:
    """The attributes and the renderer's objects of the shard sample ``key`` (``train00000012``)
    written by ``write_shapes_shards`` with ``seed`` and ``version``: its draws, repeated."""
    split = key.rstrip("0123456789")
    if split not in SPLITS or split == key:
        raise ValueError(f"{key!r} is not a key of the shapes shards (train00000012, val00000003)")
    rng = np.random.default_rng([seed, SPLITS[split], int(key[len(split) :])])
    attrs = sample_attrs(rng, version=version)
    return attrs, objects_for(attrs, rng)


class Recaptioner:
    """The caption policy of a shapes stream: ``terse`` keeps the shard's caption, ``exhaustive``
    gives every sample ``exhaustive_caption`` of its rendered scene, ``mix`` does so with
    probability ``exhaustive_fraction`` (a draw from the stream's own random stream, so it differs
    between ranks and workers and repeats under the same seed).

    The scene's objects are replayed from the sample's key with the data's ``seed`` and ``version``;
    a sample whose replayed attributes differ from its ``.json`` (shards written otherwise) is
    described from its attributes alone (``scene_facts``). The held-out single objects of the
    version (both parts) are withheld: an object of a two-object or count scene that is one of
    them is named without its size, so the training captions name no held-out combination."""

    def __init__(
        self,
        captions: str = "terse",
        exhaustive_fraction: float = 0.95,
        seed: int = 0,
        version: int = DATA_VERSION,
    ):
        if captions not in ("terse", "exhaustive", "mix"):
            raise ValueError(f"unknown caption mode {captions!r}; choose terse, exhaustive or mix")
        if not 0.0 <= exhaustive_fraction <= 1.0:
            raise ValueError(f"exhaustive_fraction must lie in [0, 1], got {exhaustive_fraction}")
        self.captions, self.fraction, self.seed, self.version = captions, exhaustive_fraction, seed, version
        self.withhold = frozenset().union(*heldout_units(version)["single"].values())

    def describe(self, key: str, meta: dict) -> str:
        try:
            attrs, objects = replay_scene(key, self.seed, self.version)
        except ValueError:
            attrs, objects = meta, None
        return exhaustive_caption(meta, objects if attrs == meta else None, self.withhold)

    def __call__(self, key: str, meta: dict, caption: str, rng: random.Random) -> str:
        if self.captions == "terse" or not meta:
            return caption
        if self.captions == "mix" and rng.random() >= self.fraction:
            return caption
        return self.describe(key, meta)


class SceneLayouts:
    """The layout of a shapes sample: ``{"layout": true_boxes(objects)}``, its objects replayed from
    the sample's key with the data's ``seed`` and ``version`` (a ``ShardStream.annotate`` hook). A
    sample whose replayed attributes differ from its ``.json`` (shards written otherwise), or whose
    key is not a shapes key, is skipped and counted as ``no_layout``: a wrong layout is worse than none."""

    def __init__(self, seed: int = 0, version: int = DATA_VERSION):
        self.seed, self.version = seed, version

    def __call__(self, key: str, meta: dict) -> dict:
        try:
            attrs, objects = replay_scene(key, self.seed, self.version)
        except ValueError:
            raise SampleError("no_layout") from None
        if attrs != meta:
            raise SampleError("no_layout")
        return {"layout": true_boxes(objects)}
