"""The ShapesScore callback scores any method's ``generate`` on the held-out prompts."""

import numpy as np
import torch

from callbacks import ShapesScore
from datamodules.shapes import heldout_prompts, objects_for, render


class Renderer(torch.nn.Module):
    """A stand-in method: draws what a prompt asks for (``wrong`` draws another prompt's scene)."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.scenes = {c: a for c, a in heldout_prompts("all")}
        self.wrong = wrong
        self.calls = []
        self.asked = set()

    def generate(self, prompts, *, seed=None):
        self.calls.append((len(prompts), seed))
        self.asked |= set(prompts)
        keys = list(self.scenes)
        images = []
        for p in prompts:
            attrs = self.scenes[keys[(keys.index(p) + 7) % len(keys)]] if self.wrong else self.scenes[p]
            img = np.asarray(render(objects_for(attrs, np.random.default_rng(0)), 32), dtype=np.float32)
            images.append(torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1)
        return torch.stack(images)


def test_shapes_score_rewards_the_right_images_and_only_those():
    right = ShapesScore(seeds=2, batch_size=10).evaluate(Renderer())
    assert right["all"] > 0.95 and right["colour"] > 0.95
    wrong = ShapesScore(seeds=1).evaluate(Renderer(wrong=True))
    assert wrong["all"] < 0.3


def test_shapes_score_covers_every_prompt_for_every_seed_in_batches():
    model = Renderer()
    ShapesScore(seeds=3, batch_size=10).evaluate(model)
    n = len(heldout_prompts("val"))
    assert sum(size for size, _ in model.calls) == 3 * n
    val, test = ({c for c, _ in heldout_prompts(part)} for part in ("val", "test"))
    assert model.asked == val and not model.asked & test  # selection never sees the test half
    assert max(size for size, _ in model.calls) == 10
    seeds = [s for _, call_seeds in model.calls for s in call_seeds]
    assert len(set(seeds)) == len(seeds) == 3 * n  # every image its own seed


def test_shapes_score_steps_aside_for_models_that_cannot_start_from_text():
    class NeedsAnImage:
        def generate(self, prompts, *, seed=None):
            raise NotImplementedError("needs low_res images")

    class Trainer:
        sanity_checking, global_rank, world_size = False, 0, 1

    callback = ShapesScore()
    callback.on_validation_epoch_end(Trainer(), NeedsAnImage())
    assert not callback.enabled


def test_shares_of_several_ranks_combine_to_the_one_process_score():
    """Each rank scores every world_size-th image; the gathered rows give the one-process rates."""

    class EveryThirdWrong(Renderer):
        def generate(self, prompts, *, seed=None):
            self.wrong = False
            right = super().generate(prompts, seed=seed)
            self.wrong = True
            wrong = super().generate(prompts, seed=seed)
            return torch.stack([w if s % 3 == 0 else r for r, w, s in zip(right, wrong, seed)])

    callback = ShapesScore(seeds=2, batch_size=4)
    one = callback.evaluate(EveryThirdWrong())
    assert 0.4 < one["all"] < 0.9
    for world in (2, 3, 5):
        shares = [callback.score_share(EveryThirdWrong(), rank, world) for rank in range(world)]
        assert callback.rates(torch.stack(shares)) == one, world


def test_shapes_score_takes_the_held_out_prompts_of_its_datamodules_version(tmp_path):
    from types import SimpleNamespace

    from datamodules import ShapesDataModule

    callback = ShapesScore()
    assert [c for c, _ in callback.prompts] == [c for c, _ in heldout_prompts("val", version=2)]
    dm = ShapesDataModule(root=str(tmp_path / "v1"), version=1)
    callback.setup(SimpleNamespace(datamodule=dm), torch.nn.Module(), "fit")
    assert [c for c, _ in callback.prompts] == [c for c, _ in heldout_prompts("val", version=1)]
    pinned = ShapesScore(version=2)
    pinned.setup(SimpleNamespace(datamodule=dm), torch.nn.Module(), "fit")
    assert [c for c, _ in pinned.prompts] == [c for c, _ in heldout_prompts("val", version=2)]


def test_a_run_resumes_only_on_the_data_version_it_began_with(tmp_path):
    import pytest

    from datamodules import ShapesDataModule

    saved = ShapesDataModule(root=str(tmp_path / "a"), version=1).state_dict()
    assert saved["shapes_version"] == 1
    ShapesDataModule(root=str(tmp_path / "a"), version=1).load_state_dict(saved)
    with pytest.raises(ValueError, match="trained on shapes data version 1.*--data.init_args.version 1"):
        ShapesDataModule(root=str(tmp_path / "b"), version=2).load_state_dict(saved)
    with pytest.raises(ValueError, match="trained on shapes data version 1"):  # saved before the field
        ShapesDataModule(root=str(tmp_path / "b")).load_state_dict({"skipped_train": {}})
    with pytest.raises(ValueError, match="unknown shapes data version 7"):
        ShapesDataModule(root=str(tmp_path / "c"), version=7)


def test_shapes_score_is_off_on_openmoji_data_and_generates_nothing(tmp_path):
    from types import SimpleNamespace

    import pytest
    from lightning.pytorch.callbacks import ModelCheckpoint

    from datamodules import OpenMojiDataModule

    by_score = ModelCheckpoint(monitor="val/shapes_all_correct", mode="max", save_top_k=1)
    by_loss = ModelCheckpoint(monitor="val/loss", save_top_k=1)

    class Trainer:
        sanity_checking, global_rank, world_size = False, 0, 1
        datamodule = OpenMojiDataModule(root=str(tmp_path / "om"), resolution=16)
        checkpoint_callbacks = [by_score, by_loss]

    callback, method = ShapesScore(), Renderer()
    with pytest.warns(UserWarning, match="holds openmoji data, not shapes"):
        callback.setup(Trainer(), method, "fit")
    callback.on_validation_epoch_end(Trainer(), method)
    assert not callback.enabled and method.calls == [] and callback.last == {}
    # the best-by-score checkpoint, which would fail at the first validation (its key is never
    # logged), keeps last.ckpt alone; another monitor is left as it was
    assert by_score.save_top_k == 0 and by_loss.save_top_k == 1
    shapes = ShapesScore()
    shapes.setup(SimpleNamespace(datamodule=None), method, "fit")
    assert shapes.enabled
