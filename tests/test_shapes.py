import numpy as np
import pytest
import torch

from datamodules import shapes as S


@pytest.mark.parametrize("resolution", [32, 64])
def test_scorer_reads_rendered_scenes_back(resolution):
    results = []
    for i in range(150):
        img, _, attrs = S.make_sample(np.random.default_rng([11, i]), resolution, heldout="any")
        results.append(S.score(img, attrs)["all"])
    assert np.mean(results) >= 0.97


def test_scorer_at_16px_is_mostly_right_on_single_objects():
    results = []
    for i in range(150):
        img, _, attrs = S.make_sample(np.random.default_rng([12, i]), 16, kinds={"single": 1.0})
        results.append(S.score(img, attrs)["all"])
    assert np.mean(results) >= 0.9


def test_noise_scores_near_zero_and_wrong_prompts_near_chance():
    rng = np.random.default_rng(0)
    noise = [S.score(torch.rand(3, 32, 32) * 2 - 1, S.sample_attrs(rng))["all"] for _ in range(100)]
    assert np.mean(noise) <= 0.05
    # An image of one single-object scene scored against another random single-object prompt:
    # each attribute should be right about as often as chance (1/6 colours, 1/3 shapes, 1/5 positions).
    colour, shape, position = [], [], []
    for i in range(300):
        img, _, _ = S.make_sample(np.random.default_rng([13, i]), 32, kinds={"single": 1.0})
        other = S.sample_attrs(np.random.default_rng([14, i]), kinds={"single": 1.0}, heldout="any")
        r = S.score(img, other)
        colour.append(r["colour"]), shape.append(r["shape"] and r["colour"]), position.append(r["position"])
    assert abs(np.mean(colour) - 1 / 6) < 0.08
    assert np.mean(position) < 0.2 + 0.1
    assert np.mean(shape) < 0.15


def test_scorer_distinguishes_each_attribute():
    attrs = S.single_attrs("red", "circle", "large", "left")
    img = S.render(S.objects_for(attrs, np.random.default_rng(0)), 32)
    assert S.score(img, attrs)["all"]
    for field, other in [("colour", "blue"), ("shape", "square"), ("size", "small"), ("position", "right")]:
        wrong = S.single_attrs(**{**attrs["objects"][0], field: other})
        r = S.score(img, wrong)
        assert not r[field] and not r["all"], field


def test_generation_is_deterministic_and_refuses_other_parameters(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    S.write_shapes_shards(str(a), 16, num_train=50, num_val=8, seed=3, shard_size=25)
    S.write_shapes_shards(str(b), 16, num_train=50, num_val=8, seed=3, shard_size=25)
    for name in ("train/shapes-00000.tar", "train/shapes-00001.tar", "val/shapes-00000.tar", "heldout.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(FileExistsError):
        S.write_shapes_shards(str(a), 16, num_train=51, num_val=8, seed=3, shard_size=25)
    with pytest.raises(FileExistsError):  # a version 2 root is not read as version 1, nor the reverse
        S.write_shapes_shards(str(a), 16, num_train=50, num_val=8, seed=3, shard_size=25, version=1)
    with pytest.raises(ValueError, match="unknown shapes data version 3"):
        S.write_shapes_shards(str(tmp_path / "c"), 16, num_train=5, num_val=2, version=3)


def test_version_1_keeps_its_vocabulary_and_its_held_out_singles(tmp_path):
    rng = np.random.default_rng(0)
    drawn = [S.sample_attrs(rng, version=1) for _ in range(3000)]
    v1 = S.vocabulary(1)
    singles = {tuple(d["objects"][0].values()) for d in drawn if d["kind"] == "single"}
    assert not singles & S.HELDOUT and len(S.heldout_prompts("all", version=1)) == len(S.HELDOUT) > 10
    assert {o["colour"] for d in drawn for o in d["objects"]} == set(v1.colours)  # no orange or cyan
    assert {d["objects"][0]["position"] for d in drawn if d["kind"] == "single"} == set(v1.positions)
    assert {d["count"] for d in drawn if d["kind"] == "count"} == {2, 3, 4}
    val, test = ({c for c, _ in S.heldout_prompts(part, version=1)} for part in ("val", "test"))
    assert not val & test and val | test == {c for c, _ in S.heldout_prompts(version=1)} and abs(len(val) - len(test)) <= 1
    with pytest.raises(ValueError, match="held-out part"):
        S.heldout_prompts("train")
    with pytest.raises(ValueError, match="holds no 'counting' prompts out"):
        S._heldout_attrs("counting", "test", 1)


def _units(attrs: dict) -> set[tuple]:
    """Every held-out unit (``HELDOUT_UNITS``) a scene or a prompt contains, spelt independently of
    the module's own check: what the training stream must never show."""
    objects = [(o["colour"], o["shape"]) for o in attrs["objects"]]
    if attrs["kind"] == "single":
        o = attrs["objects"][0]
        return {("single", o["colour"], o["shape"], o["size"], o["position"])}
    if attrs["kind"] == "count":
        return {("counting", attrs["count"], objects[0][1], objects[0][0])}
    out = {("colour_binding", *o) for o in objects} | {("two_objects", *sorted(objects))}
    if attrs["kind"] == "relation":
        a, b = objects
        mirror = {"right of": "left of", "below": "above"}
        rel = attrs["relation"]
        out.add(("position", b, mirror[rel], a) if rel in mirror else ("position", a, rel, b))
    return out


def test_training_stream_contains_no_held_out_combination_of_any_set(tmp_path):
    pairings = S.heldout_units()["colour_binding"]
    held = {part: {("colour_binding", *o) for o in pairings[part]} for part in ("val", "test")}
    for part, other in (("val", "test"), ("test", "val")):
        for name in S.PROMPT_SETS:
            prompts = S.prompt_set(name, part=part)
            assert prompts, (name, part)
            for _, attrs in prompts:
                if name == "colour_binding":  # one of its objects may be a pairing that is not held out
                    named = {(o["colour"], o["shape"]) for o in attrs["objects"]}
                    assert named & pairings[part] and not named & pairings[other], attrs
                else:
                    held[part] |= {u for u in _units(attrs) if u[0] == name}
    assert not held["val"] & held["test"]
    rng = np.random.default_rng(1)
    seen: set[tuple] = set()
    for _ in range(20000):
        seen |= _units(S.sample_attrs(rng))
    assert not seen & (held["val"] | held["test"])
    # every word still reaches training, in every kind of scene that uses it
    assert {u[1] for u in seen if u[0] == "single"} == set(S.COLOURS)
    assert {u[4] for u in seen if u[0] == "single"} == set(S.POSITIONS)
    assert {u[1] for u in seen if u[0] == "counting"} == {2, 3, 4, 5}
    assert {u[1] for u in seen if u[0] == "colour_binding"} == set(S.COLOURS)
    # the written shards (train and val) hold the same guarantee
    import json
    import tarfile

    S.write_shapes_shards(str(tmp_path), 16, num_train=300, num_val=40, seed=5, shard_size=200)
    written = set()
    for split in ("train", "val"):
        for shard in sorted((tmp_path / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        written |= _units(json.load(tar.extractfile(member)))
    assert len(written) > 100 and not written & (held["val"] | held["test"])
    lines = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert {(x["set"], x["part"]) for x in lines} == {(n, p) for n in S.PROMPT_SETS for p in ("val", "test")}


def test_held_out_parts_are_disjoint_and_the_sets_are_larger():
    sizes = {}
    for name in S.PROMPT_SETS:
        val, test = (S.prompt_set(name, part=part) for part in ("val", "test"))
        assert not {c for c, _ in val} & {c for c, _ in test}, name
        assert not {S.scene_key(a) for _, a in val} & {S.scene_key(a) for _, a in test}, name
        sizes[name] = len(test)
        assert len({c for c, _ in test}) == len(test)
        assert S.prompt_set(name, 10, seed=1) != S.prompt_set(name, 10, seed=2)  # the seed orders them
        assert {c for c, _ in S.prompt_set(name, 10, seed=1)} <= {c for c, _ in test}
    assert sizes["single"] >= 100 and min(sizes.values()) >= 30, sizes
    # the two-object sets nest: no two_objects or position prompt names a held-out pairing
    bound = frozenset().union(*S.heldout_units()["colour_binding"].values())
    for name in ("two_objects", "position"):
        for part in ("val", "test"):
            for _, a in S.prompt_set(name, part=part):
                assert not {(o["colour"], o["shape"]) for o in a["objects"]} & bound
    assert S.caption(S._two("two_objects", ("orange", "circle"), ("red", "square")))[0] == (
        "an orange circle and a red square"
    )


def _blur(x):
    from torchvision.transforms.v2 import functional as TF

    return TF.gaussian_blur(x, kernel_size=5, sigma=1.0)


def _down_up(x):
    import torch.nn.functional as F

    half = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
    return F.interpolate(half, scale_factor=2, mode="bilinear")


@pytest.mark.parametrize("soften", [_blur, _down_up], ids=["blur 1px", "2x down-up"])
def test_soft_renders_read_as_sharp_ones_in_every_set_and_wrong_ones_still_fail(soften):
    from evaluation.harness import Protocol, prompts_for, render_real

    protocol = Protocol(prompts=26, seeds=1)
    prompts = prompts_for(protocol)
    real = render_real(prompts, protocol)
    for name, items in prompts.items():
        images = soften(real[name].flatten(0, 1))
        rate = np.mean([S.score(x, attrs)["all"] for x, (_, attrs) in zip(images, items)])
        assert rate >= 0.95, (name, rate)
    # the same softening of a wrong shape or a wrong colour still fails
    wrong_shape, wrong_colour = [], []
    for i, (_, attrs) in enumerate(prompts["single"]):
        o = attrs["objects"][0]
        for field, values, out in (("shape", S.SHAPES, wrong_shape), ("colour", list(S.COLOURS), wrong_colour)):
            other = S.single_attrs(**{**o, field: values[(values.index(o[field]) + 1 + i % 2) % len(values)]})
            img = S.render(S.objects_for(other, np.random.default_rng(i)), 32)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
            out.append(S.score(soften(x)[0], attrs)["all"])
    assert np.mean(wrong_shape) <= 0.05 and np.mean(wrong_colour) == 0.0


def test_a_region_no_shape_explains_is_no_shape():
    """A ring or a 2:1 bar in the prompt's colour and place is not read as a circle or a square."""
    from PIL import Image, ImageDraw

    def drawn(paint):
        img = Image.new("RGB", (128, 128), S.BACKGROUND)
        paint(ImageDraw.Draw(img), 128, S.COLOURS["red"])
        return img.resize((32, 32), Image.BOX)

    def ring(d, w, c):
        d.ellipse([w * 0.27] * 2 + [w * 0.73] * 2, fill=c)
        d.ellipse([w * 0.38] * 2 + [w * 0.62] * 2, fill=S.BACKGROUND)

    bar = drawn(lambda d, w, c: d.rectangle([w * 0.27, w * 0.4, w * 0.73, w * 0.6], fill=c))
    assert [b.shape for b in S.find_blobs(drawn(ring))] == ["unknown"] == [b.shape for b in S.find_blobs(bar)]
    assert not S.score(drawn(ring), S.single_attrs("red", "circle", "large", "center"))["all"]
    assert not S.score(bar, S.single_attrs("red", "square", "large", "center"))["all"]
