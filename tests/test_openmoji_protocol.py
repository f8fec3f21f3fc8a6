"""The comparison protocol on OpenMoji: its prompts are exactly the held-out designs of the
methods' data, the variant reader scores renders right and other variants wrong, the floors are
the random-variant stand-in's exact rate, and ``evaluate.py`` makes the table end to end."""

import glob
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import yaml

import evaluate
from datamodules import openmoji as O
from evaluation import openmoji_protocol as OM
from evaluation.harness import Protocol, floors, prompts_for, quality, render_real
from lightning_modules.base import TextToImageModule

RESOLUTION = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("openmoji") / "om32")
    O.write_openmoji_shards(root, resolution=RESOLUTION, shard_size=1000)
    return root


def _train_captions(root: str) -> set[str]:
    out = set()
    for path in glob.glob(os.path.join(root, "train", "*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    out.update(tar.extractfile(member).read().decode("utf-8").splitlines())
    return out


def test_the_prompts_are_the_held_out_designs_of_the_part_in_both_languages(data):
    train = _train_captions(data)
    test = OM.prompt_sets(data, list(OM.SETS), "test")
    val = OM.prompt_sets(data, list(OM.SETS), "val")
    for name in OM.SETS:
        assert test[name] and val[name], name
        assert not {c for c, _ in test[name]} & train and not {c for c, _ in val[name]} & train, name
        assert not {a["key"] for _, a in test[name]} & {a["key"] for _, a in val[name]}, name
        for caption, attrs in test[name]:
            assert OM.split_of(name) in attrs["held_out_by"] and attrs["part"] == "test"
            assert caption == ("эмодзи: " + attrs["ru"] if name.endswith("_ru") else "emoji: " + attrs["en"])
    # the same designs in both languages, in an order the seed fixes
    assert [a["key"] for _, a in test["tone"]] != [a["key"] for _, a in test["tone_ru"]]  # each set its own order
    assert sorted(a["key"] for _, a in test["tone"]) == sorted(a["key"] for _, a in test["tone_ru"])
    assert OM.prompt_sets(data, ["gender"], "test", seed=3) == OM.prompt_sets(data, ["gender"], "test", seed=3)
    assert OM.prompt_sets(data, ["gender"], "test", seed=3) != OM.prompt_sets(data, ["gender"], "test", seed=4)
    assert len(OM.prompt_sets(data, ["gender"], "test", limit=5)["gender"]) == 5
    with pytest.raises(ValueError, match="the OpenMoji sets are"):
        OM.prompt_sets(data, ["counting"], "test")
    with pytest.raises(FileNotFoundError, match="make_shards.py openmoji"):
        OM.prompt_sets(os.path.dirname(data), ["tone"], "test")


def _protocol(data, **changes) -> Protocol:
    return Protocol(**{"dataset": "openmoji", "data_root": data, "prompt_sets": ["tone", "colour", "gender"],
                       "seeds": 2, "prompts": 12, "resolution": RESOLUTION, **changes})  # fmt: skip


def _other_variant(attrs: dict) -> O.Design:
    design = OM.design_of(attrs)
    own = design.tone or design.colour
    return next(v for label, v in OM.reader(RESOLUTION).variants(design).items() if label != own)


def test_the_reader_scores_renders_right_and_another_variant_wrong_and_the_floor_is_a_random_variant(data):
    protocol = _protocol(data)
    prompts = prompts_for(protocol)
    real = render_real(prompts, protocol)
    assert set(OM.hits(real["tone"], prompts["tone"], "tone").ravel()) == {1.0}
    assert set(OM.hits(real["colour"], prompts["colour"], "colour").ravel()) == {1.0}
    assert OM.hits(real["gender"], prompts["gender"], "gender") is None  # judge only
    wrong = torch.stack([OM.render_design(_other_variant(a), RESOLUTION) for _, a in prompts["tone"]])
    assert OM.hits(wrong[:, None], prompts["tone"], "tone").sum() == 0
    set_floors = floors(prompts, protocol)
    assert set(set_floors) == {"tone", "colour"}
    # the reader is right on every render, so a random variant is right 1 time in (number of variants)
    expected = np.mean([1 / len(OM.reader(RESOLUTION).variants(OM.design_of(a))) for _, a in prompts["tone"]])
    assert set_floors["tone"]["floor"] == pytest.approx(expected) and 0.15 < expected < 0.35
    # and a stand-in that draws random variants scores about the floor
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(8):
        images = []
        for _, a in prompts["tone"]:
            variants = list(OM.reader(RESOLUTION).variants(OM.design_of(a)).values())
            images.append(OM.render_design(variants[rng.integers(len(variants))], RESOLUTION))
        drawn.append(OM.hits(torch.stack(images)[:, None], prompts["tone"], "tone").mean())
    assert abs(np.mean(drawn) - expected) < 0.12


class TableCLIP(torch.nn.Module):
    """A perfect judge: an image's embedding is its design's axis, a caption's the axis of the
    design it names (in either language)."""

    def __init__(self, axes: dict[str, torch.Tensor], images: torch.Tensor):
        super().__init__()
        self.axes, self.images = axes, images

    def encode_image(self, images):
        return self.images[: len(images)]

    def encode_text(self, prompts):
        return torch.stack([self.axes[p] for p in prompts])


def test_quality_reports_reader_columns_and_r_precision_per_set_with_a_perfect_judge(data):
    protocol = _protocol(data, prompt_sets=["gender_ru"], seeds=1)
    prompts = prompts_for(protocol)
    items = prompts["gender_ru"]
    pool = OM.name_pool("ru")
    assert {c for c, _ in items} <= set(pool) and len(pool) > 3000
    axes = {c: torch.nn.functional.one_hot(torch.tensor(i), len(pool)).float() for i, c in enumerate(pool)}
    judge = TableCLIP(axes, torch.stack([axes[c] for c, _ in items]))
    real = render_real(prompts, protocol)
    row = quality(real, prompts, protocol, clip=judge)
    assert row["r_precision_gender_ru"] == 1.0 and row["r_precision"] == 1.0
    assert "openmoji_overall" not in row and "shapes_overall" not in row  # no set here is read analytically
    shifted = TableCLIP(axes, torch.stack([axes[c] for c, _ in items[1:] + items[:1]]))  # each image another design's
    # the true name is never the nearest; where the other design's name is not among the 99 drawn,
    # all 100 tie at 0 and the image counts 1/100
    assert quality(real, prompts, protocol, clip=shifted)["r_precision_gender_ru"] <= 0.01 + 1e-9


class RenderOpenMoji(TextToImageModule):
    """A stand-in generator: the render of the design the caption names, or (``wrong``) of another
    variant of it."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.wrong = wrong
        self.by_caption = {c: d for d in OM.designs().values() for c in O.captions(d)}

    def generate(self, prompts, *, seed=None, **sampling):
        self.check_sampling(sampling)
        out = []
        for caption in prompts:
            design = self.by_caption[caption]
            if self.wrong and (design.tone or design.colour):
                design = _other_variant({"key": design.key})
            out.append(OM.render_design(design, RESOLUTION))
        return torch.stack(out)


def test_evaluate_makes_the_openmoji_table_with_reader_cells_floors_and_daggers(data, tmp_path, capsys):
    config = {
        "dataset": "openmoji", "data_root": data, "output": str(tmp_path / "out"), "prompt_sets": ["tone", "colour_ru"],
        "prompts_per_set": 6, "seeds": 2, "clip": None, "cache": None, "wandb": {"enabled": False},
        "methods": [{"name": "render", "model": {"class_path": "test_openmoji_protocol.RenderOpenMoji"}},
                    {"name": "wrong variant", "model": {"class_path": "test_openmoji_protocol.RenderOpenMoji",
                                                         "init_args": {"wrong": True}}}],
        "paired": [["render", "wrong variant"]],
    }  # fmt: skip
    path = tmp_path / "openmoji.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    assert evaluate.main(["--config", str(path)]) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["method"]: r for r in record["rows"]}
    assert rows["render"]["openmoji_tone"] == 1.0 and rows["render"]["openmoji_colour_ru"] == 1.0
    assert rows["wrong variant"]["openmoji_overall"] == 0.0 and rows["wrong variant"]["openmoji_tone_under_floor"]
    assert not rows["render"]["openmoji_tone_under_floor"]
    assert record["paired"]["render - wrong variant"]["overall"][0] == 1.0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "# Comparison on the openmoji prompt sets" in table and "tone (reader)" in table and "†" in table
    assert "random variant" in table


def test_an_openmoji_config_refuses_a_method_trained_on_other_data_or_on_the_held_out_designs(data, tmp_path, capsys):
    import json

    # a quarter of the training designs, the same held-out ones (passes), and a root that holds out others
    held = open(os.path.join(data, "heldout.jsonl"), encoding="utf-8").read()
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    for name, text in (("quarter", held), ("other_split", "".join(held.splitlines(True)[1:]))):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "heldout.jsonl").write_text(text, encoding="utf-8")
        (tmp_path / name / "manifest.json").write_text(json.dumps({**manifest, "train_fraction": 0.25}))
    runs = {}
    for name, dm in {"shapes": {"class_path": "datamodules.ShapesDataModule", "init_args": {}},
                     "judge_data": {"class_path": "datamodules.OpenMojiDataModule",
                                    "init_args": {"root": data, "hold_out": False}},
                     "other_root": {"class_path": "datamodules.OpenMojiDataModule",
                                    "init_args": {"root": str(tmp_path / "elsewhere")}},
                     "quarter_run": {"class_path": "datamodules.OpenMojiDataModule",
                                     "init_args": {"root": str(tmp_path / "quarter"), "train_fraction": 0.25}},
                     "other_split_run": {"class_path": "datamodules.OpenMojiDataModule",
                                         "init_args": {"root": str(tmp_path / "other_split")}}}.items():  # fmt: skip
        os.makedirs(tmp_path / name / "checkpoints")
        (tmp_path / name / "checkpoints" / "last.ckpt").write_bytes(b"")
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"data": dm}))
        runs[name] = str(tmp_path / name / "checkpoints" / "last.ckpt")
    cfg = {"dataset": "openmoji", "data_root": data, "methods": [{"name": n, "checkpoint": p} for n, p in runs.items()]}
    errors = evaluate.openmoji_data_problems(cfg)
    assert len(errors) == 4
    assert "ShapesDataModule" in errors[0] and "hold_out: false" in errors[1] and "elsewhere" in errors[2]
    assert "other_split" in errors[3]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"dataset": "openmoji", "methods": [{"name": "x", "checkpoint": runs["shapes"]}]}))
    assert evaluate.main(["--config", str(bad)]) == 2
    assert "needs data_root" in capsys.readouterr().err


def test_a_judge_sharing_a_methods_seed_or_drawn_like_the_methods_data_is_refused(data, tmp_path, capsys):
    def run(name: str, seed: int | None, clip: bool = False, data_args: dict | None = None, config: bool = True) -> str:
        os.makedirs(tmp_path / name / "checkpoints")
        path = str(tmp_path / name / "checkpoints" / "last.ckpt")
        hparams = {"image_tower": {}, "text_tower": {}} if clip else {}
        torch.save({"hyper_parameters": hparams, "clip_lineage": {"origin": name}}, path)
        if config:
            dm = {"class_path": "datamodules.OpenMojiDataModule", "init_args": {"root": data, **(data_args or {})}}
            (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"seed_everything": seed, "data": dm}))
        return path

    gen, rerank_clip, old_clip = run("gen", 0), run("rerank_clip", 1001, clip=True), run("old_clip", 3, clip=True)
    centred = run("judge_centred", 0, clip=True, data_args={"hold_out": False})
    jittered = run("judge_jittered", 1001, clip=True, data_args={"hold_out": False, "render_seed": 7, "renders": 4})
    unknown = run("unknown", None, config=False)
    methods = [{"name": "gen", "checkpoint": gen},
               {"name": "rerank", "model": {"class_path": "x.Rerank", "init_args": {"generator": gen, "clip": rerank_clip}}}]
    cfg = {"dataset": "openmoji", "data_root": data, "methods": methods}

    errors, notes = evaluate.judge_independence_problems({**cfg, "clip": centred})
    assert len(errors) == 3 and not notes  # gen's seed 0, twice (two methods name it), and the centred drawings
    assert "seed_everything 0" in errors[0] and "methods[gen]" in errors[0] and "methods[rerank]" in errors[1]
    assert "render_seed" in errors[2]
    errors, _ = evaluate.judge_independence_problems({**cfg, "clip": jittered})
    assert len(errors) == 1 and "seed_everything 1001" in errors[0] and "rerank_clip" in errors[0]  # a CLIP of its seed
    methods[1]["model"]["init_args"]["clip"] = old_clip
    assert evaluate.judge_independence_problems({**cfg, "clip": jittered}) == ([], [])
    errors, notes = evaluate.judge_independence_problems({**cfg, "methods": [{"name": "u", "checkpoint": unknown}],
                                                          "clip": jittered})  # fmt: skip
    assert errors == [] and "no run config.yaml" in notes[0]
    _, notes = evaluate.judge_independence_problems({**cfg, "clip": run("unknown_clip", None, clip=True, config=False)})
    assert "seed and data cannot be checked" in notes[0]
    errors, _ = evaluate.judge_independence_problems({**cfg, "dataset": "shapes", "clip": centred})
    assert len(errors) == 2  # on shapes, the seed alone (the shapes judge draws its own data_seed)
    # an autoencoder named inside a method's checkpoint (a prior's) is checked too
    autoencoder = run("autoencoder", 1001)
    prior = str(tmp_path / "prior.ckpt")
    torch.save({"hyper_parameters": {"autoencoder": autoencoder}}, prior)
    errors, _ = evaluate.judge_independence_problems({**cfg, "methods": [{"name": "ar", "checkpoint": prior}], "clip": jittered})
    assert len(errors) == 1 and "autoencoder" in errors[0]
    no_seed = run("no_seed", None, clip=True, data_args={"render_seed": 7})
    _, notes = evaluate.judge_independence_problems({**cfg, "methods": [], "clip": no_seed})
    assert "records no fixed seed_everything" in notes[0]
    assert evaluate.judge_independence_problems({**cfg, "clip": gen}) == ([], [])  # not a CLIP: load_clip's error
    # and evaluate.py refuses before any work, naming the problem
    config = tmp_path / "refused.yaml"
    config.write_text(yaml.safe_dump({"dataset": "openmoji", "data_root": data, "output": str(tmp_path / "out"),
                                      "prompt_sets": ["tone"], "clip": centred, "cache": None, "wandb": {"enabled": False},
                                      "methods": [{"name": "gen", "checkpoint": gen}]}))  # fmt: skip
    assert evaluate.main(["--config", str(config)]) == 2
    assert "render_seed" in capsys.readouterr().err and not (tmp_path / "out" / "results.json").exists()
