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


def test_generation_is_deterministic_and_excludes_heldout(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    S.write_shapes_shards(str(a), 16, num_train=50, num_val=8, seed=3, shard_size=25)
    S.write_shapes_shards(str(b), 16, num_train=50, num_val=8, seed=3, shard_size=25)
    for name in ("train/shapes-00000.tar", "train/shapes-00001.tar", "val/shapes-00000.tar"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(FileExistsError):
        S.write_shapes_shards(str(a), 16, num_train=51, num_val=8, seed=3, shard_size=25)
    rng = np.random.default_rng(0)
    drawn = [S.sample_attrs(rng, kinds={"single": 1.0}) for _ in range(2000)]
    combos = {tuple(d["objects"][0].values()) for d in drawn}
    assert not combos & S.HELDOUT
    assert len(S.heldout_prompts()) == len(S.HELDOUT) > 10
    val, test = ({c for c, _ in S.heldout_prompts(part)} for part in ("val", "test"))
    assert not val & test and val | test == {c for c, _ in S.heldout_prompts()} and abs(len(val) - len(test)) <= 1
    with pytest.raises(ValueError, match="held-out part"):
        S.heldout_prompts("train")


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
