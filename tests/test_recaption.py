import hashlib
import io
import itertools
import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from datamodules import recaption as R
from datamodules import shapes as S
from datamodules.shapes_datamodule import ShapesDataModule


def _scenes(n: int, seed: int = 0):
    """``n`` scenes of every kind the data and the prompt sets have, with the renderer's objects."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if i % 5 == 4:  # the prompt sets' two-object kinds, drawn as the renderer places them
            kind = ("two_objects", "colour_binding")[i % 2]
            attrs = S._pair_scene(rng, kind, S.DATA_VERSION)
        else:
            attrs = S.sample_attrs(rng, heldout="any")
        out.append((attrs, S.objects_for(attrs, rng)))
    return out


def _position_phrases(text: str) -> set[str]:
    """The named positions a caption mentions, longest phrase first ("at the top left" is not "at the top")."""
    found = set()
    for name, phrase in sorted(S.POSITION_PHRASES.items(), key=lambda kv: -len(kv[1])):
        if phrase in text:
            found.add(name)
            text = text.replace(phrase, "|")
    return found


def test_exhaustive_captions_state_what_the_scorer_reads_in_the_render_and_nothing_else():
    kinds = set()
    for attrs, objects in _scenes(250):
        kinds.add(attrs["kind"])
        text = R.exhaustive_caption(attrs, objects)
        facts = R.parse_exhaustive(text)
        assert facts == R.scene_facts(attrs, objects), text
        # every object the renderer drew, as the scorer reads it from the pixels: colour, shape, size, position
        blobs = S.find_blobs(S.render(objects, 32))
        assert len(blobs) == len(objects) == facts["count"]
        read = sorted(
            (b.colour, b.shape, "large" if b.extent > 0.35 else "small", R.position_word(b.cx, b.cy))
            for b in blobs
        )
        assert (
            sorted((o["colour"], o["shape"], o["size"], o["position"]) for o in facts["objects"]) == read
        ), text
        if attrs["kind"] == "single":
            assert facts["objects"] == [{"size": o["size"], **o} for o in attrs["objects"]]
        if attrs["kind"] in ("relation", "two_objects", "colour_binding"):
            b1, b2 = (next(b for b in blobs if b.colour == o["colour"]) for o in attrs["objects"])
            dx, dy = b1.cx - b2.cx, b1.cy - b2.cy
            axis = (
                ("left of", "right of")[int(dx > 0)] if abs(dx) > abs(dy) else ("above", "below")[int(dy > 0)]
            )
            assert facts["relation"] == axis == attrs.get("relation", axis), text
        # and no word of the vocabulary that the scene lacks
        words = text.replace(",", " ").replace(":", " ").replace(";", " ").split()
        assert {w for w in words if w in S.COLOURS} == {o.colour for o in objects}, text
        assert {w.rstrip("s") for w in words if w.rstrip("s") in S.SHAPES} == {o.shape for o in objects}, text
        assert {w for w in words if w in S.SIZES} == {r[2] for r in read}, text
        assert _position_phrases(text) == {r[3] for r in read}, text
        assert [p for p in S.RELATIONS.values() if p in text] == (
            [S.RELATIONS[facts["relation"]]] if "relation" in facts else []
        )
        assert words[0] == ({1: "one"} | S.COUNT_WORDS)[len(objects)]
        # from the attributes alone: fewer facts, each of them true
        alone = R.parse_exhaustive(R.exhaustive_caption(attrs))
        assert alone["count"] == facts["count"] and alone.get("relation", facts.get("relation")) == facts.get(
            "relation"
        )
        pairs = zip(alone["objects"], facts["objects"]) if attrs["kind"] != "count" else (
            (alone["objects"][0], o) for o in facts["objects"])  # fmt: skip
        assert all(said.items() <= true.items() for said, true in pairs), text
    assert kinds == {"single", "relation", "count", "two_objects", "colour_binding"}


def test_training_captions_name_no_held_out_single_object():
    policy = R.Recaptioner("exhaustive")
    held = frozenset().union(*S.heldout_units()["single"].values())
    assert policy.withhold == held
    withheld = 0
    for i in range(600):
        key = f"train{i:08d}"
        attrs, objects = R.replay_scene(key, 0, S.DATA_VERSION)
        facts = R.parse_exhaustive(policy.describe(key, attrs))
        named = [(o["colour"], o["shape"], o.get("size"), o.get("position")) for o in facts["objects"]]
        assert not set(named) & held, named
        full = R.scene_facts(attrs, objects)
        if (
            facts != full
        ):  # only sizes are withheld, and only where the full caption would name a held-out object
            withheld += 1
            assert any((o["colour"], o["shape"], o["size"], o["position"]) in held for o in full["objects"])
            assert [{k: v for k, v in o.items() if k != "size"} for o in full["objects"]] == [
                {k: v for k, v in o.items() if k != "size"} for o in facts["objects"]
            ]
    assert withheld > 0  # the rule is needed: relation and count scenes hold such objects


def test_terse_captions_read_back_into_their_attributes():
    for attrs, _ in _scenes(300, seed=1):
        for text in S.caption(attrs):
            parsed = R.parse_caption(text)
            want = {**attrs, "kind": "colour_binding"} if attrs["kind"] == "two_objects" else attrs
            assert parsed == want, text
    assert R.parse_caption("a red circle near a blue square") is None
    with pytest.raises(ValueError, match="no layout"):
        R.plan_layout("a red circle near a blue square")


def _planned_scene_scores(attrs: dict, prompt, resolution: int = 32) -> dict:
    layout = R.plan_layout(prompt)
    assert len(layout) == attrs["count"]
    for _, box in layout:
        assert all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]
    return S.score(S.render(R.layout_objects(layout), resolution), attrs)


def test_a_scene_drawn_at_the_planned_boxes_satisfies_the_scorer_for_every_template():
    failed = []
    v = S.vocabulary()
    # every position, size and shape (the colours in turn), every count of every colour and shape
    singles = [S.single_attrs(v.colours[i % len(v.colours)], *c)
               for i, c in enumerate(itertools.product(v.shapes, v.sizes, v.positions))]  # fmt: skip
    counts = [{"kind": "count", "objects": [{"colour": c, "shape": s}], "count": n}
              for n in v.counts for s in v.shapes for c in v.colours]  # fmt: skip
    rng = np.random.default_rng(5)
    relations = []
    for i in range(96):  # every relation, with many object pairs
        a = S.sample_attrs(rng, kinds={"relation": 1.0}, heldout="any")
        relations.append({**a, "relation": list(S.RELATIONS)[i % 4]})
    pairs = [a for name in ("two_objects", "colour_binding") for _, a in S.prompt_set(name, n=40, part="any")]
    for attrs in singles + counts + relations + pairs:
        result = _planned_scene_scores(attrs, attrs)
        if not result["all"]:
            failed.append((attrs, result))
        for text in S.caption(attrs):  # each caption template plans the same layout
            assert R.plan_layout(text) == R.plan_layout(attrs), text
    assert not failed, failed[:5]


def test_the_planner_follows_the_renderers_geometry():
    for attrs, objects in _scenes(300, seed=2):
        planned = R.plan_layout(attrs)
        true = R.true_boxes(objects)
        if attrs["kind"] == "single":
            (p, pb), (t, _) = planned[0], true[0]
            assert p == t  # the same phrase: the size word of the drawn extent is the prompt's
            centre = lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)  # noqa: E731
            o = objects[0]
            assert np.allclose(centre(pb), S.POSITIONS[attrs["objects"][0]["position"]])
            assert abs(o.cx - centre(pb)[0]) <= 0.04 + 1e-9 and abs(o.cy - centre(pb)[1]) <= 0.04 + 1e-9
            assert abs((pb[2] - pb[0]) / o.extent - 1) <= 0.09
        elif attrs["kind"] == "count":  # every planned cell is a cell of the renderer's grid
            slots = {(x, y) for x in (0.2, 0.5, 0.8) for y in (0.2, 0.5, 0.8)}
            assert {(round((b[0] + b[2]) / 2, 6), round((b[1] + b[3]) / 2, 6)) for _, b in planned} <= slots
            assert all(abs((b[2] - b[0]) - o.extent) < 1e-9 for (_, b), o in zip(planned, objects))
        elif attrs["kind"] == "relation":  # each object within the renderer's spread of its planned centre
            for (_, b), o in zip(planned, objects):
                assert (
                    abs(o.cx - (b[0] + b[2]) / 2) <= 0.1 + 1e-9
                    and abs(o.cy - (b[1] + b[3]) / 2) <= 0.1 + 1e-9
                )
                assert R.position_word(o.cx, o.cy) == R.position_word((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)


def test_true_boxes_hold_every_drawn_pixel_of_their_object_and_no_more():
    resolution = 32
    for _, objects in _scenes(150, seed=3):
        for (phrase, (x0, y0, x1, y1)), obj in zip(R.true_boxes(objects), objects):
            assert obj.colour in phrase and obj.shape in phrase
            drawn = np.any(np.asarray(S.render([obj], resolution)) != S.BACKGROUND, axis=-1)
            ys, xs = np.nonzero(drawn)
            # pixel j covers [j, j + 1) / resolution: each drawn pixel overlaps the box ...
            assert xs.min() + 1 > x0 * resolution and xs.max() < x1 * resolution
            assert ys.min() + 1 > y0 * resolution and ys.max() < y1 * resolution
            # ... and the drawn pixels reach each side of the box, to within a pixel
            assert xs.min() <= x0 * resolution + 1 and xs.max() + 1 >= x1 * resolution - 1
            assert ys.min() <= y0 * resolution + 1 and ys.max() + 1 >= y1 * resolution - 1


def _members(root, split: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted((root / split).glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_replayed_scenes_are_the_shards_scenes_and_the_shards_are_unchanged(tmp_path):
    S.write_shapes_shards(str(tmp_path), 16, num_train=40, num_val=8, seed=3, shard_size=20)
    members = _members(tmp_path, "train") | _members(tmp_path, "val")
    digest = hashlib.sha256()
    for key, m in members.items():
        attrs, objects = R.replay_scene(key, 3, S.DATA_VERSION)
        assert attrs == json.loads(m["json"])
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(m["png"])).convert("RGB")), np.asarray(S.render(objects, 16))
        )
        digest.update(key.encode() + m["txt"] + m["json"])
    # the terse captions and attributes of version 2, pinned: a caption mode must not change them
    assert digest.hexdigest() == PINNED_TEXT_DIGEST
    with pytest.raises(ValueError, match="not a key"):
        R.replay_scene("test00000001", 3, 2)


PINNED_TEXT_DIGEST = "c9ebdcb0ce39d530a17236396aea7cc0b5b75fcda1c267f2188b02d962b7bc09"


def test_mix_gives_the_exhaustive_caption_to_its_fraction_of_samples():
    meta = S.single_attrs("red", "circle", "small", "left")
    for fraction in (0.95, 0.3):
        policy, rng = R.Recaptioner("mix", fraction, seed=0), random.Random(7)
        n = 2000
        got = [policy(f"train{i:08d}", meta, "terse", rng) != "terse" for i in range(n)]
        sd = np.sqrt(n * fraction * (1 - fraction))
        assert abs(sum(got) - n * fraction) < 4 * sd, (fraction, sum(got))
    rng = random.Random(1)
    state = rng.getstate()
    assert R.Recaptioner("terse")("train00000001", meta, "a caption", rng) == "a caption"
    assert rng.getstate() == state  # the default draws nothing: the stream is the one it was
    always = R.Recaptioner("exhaustive", 0.0)
    assert all(always(f"val{i:08d}", meta, "terse", rng) != "terse" for i in range(50))
    with pytest.raises(ValueError, match="caption mode"):
        R.Recaptioner("long")
    with pytest.raises(ValueError, match="exhaustive_fraction"):
        R.Recaptioner("mix", 1.5)


def _stream_samples(dm: ShapesDataModule, n: int) -> list[dict]:
    dm.setup("fit")
    it = iter(dm.train_stream)
    return [next(it) for _ in range(n)]


def test_the_datamodule_recaptions_at_load_time_and_by_default_not_at_all(tmp_path):
    common = dict(root=str(tmp_path / "d"), resolution=16, num_train=40, num_val=8, shard_size=20,
                  num_workers=0, seed=0, shuffle_buffer=8)  # fmt: skip
    terse = _stream_samples(ShapesDataModule(**common), 60)
    before = sorted(p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file())
    for t in terse:
        assert t["caption"] in S.caption(t["meta"])
    plain = _stream_samples(ShapesDataModule(**common, captions="terse", exhaustive_fraction=0.1), 60)
    assert [s["caption"] for s in plain] == [s["caption"] for s in terse]
    held = frozenset().union(*S.heldout_units()["single"].values())
    mixed = _stream_samples(ShapesDataModule(**common, captions="mix", exhaustive_fraction=0.5), 200)
    full = _stream_samples(ShapesDataModule(**common, captions="exhaustive"), 60)
    for s in mixed + full:
        attrs, objects = R.replay_scene(s["key"], 0, S.DATA_VERSION)
        assert attrs == s["meta"]
        assert s["caption"] in (*S.caption(s["meta"]), R.exhaustive_caption(attrs, objects, held))
    n_exhaustive = sum(s["caption"] not in S.caption(s["meta"]) for s in mixed)
    assert 100 - 4 * 7.1 < n_exhaustive < 100 + 4 * 7.1
    assert all(s["caption"] == R.exhaustive_caption(*R.replay_scene(s["key"], 0, 2), held) for s in full)
    after = sorted(p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file())
    assert after == before  # the same shards, manifest and all, for every mode
    with pytest.raises(ValueError, match="caption mode"):
        ShapesDataModule(**common, captions="verbose")
