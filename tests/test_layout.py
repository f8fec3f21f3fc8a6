"""Layout conditioning (GLIGEN's boxes and phrases): the boxes reach the network and move the
image, no layout means no dependence on boxes, layout-free models and checkpoints are unchanged,
and the shapes datamodule gives each scene its true boxes."""

import hashlib
import os

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from datamodules import recaption as R
from datamodules import shapes as S
from datamodules.shapes_datamodule import ShapesDataModule
from datamodules.text_image import collate, pad_layouts
from lightning_modules.diffusion import TextToImageDiffusion
from networks.errors import ConfigError
from networks.text_encoders import TransformerTextEncoder
from networks.unet import UNet

LAYOUT_A = [("a small red circle", (0.05, 0.05, 0.4, 0.4)), ("a small blue square", (0.6, 0.6, 0.95, 0.95))]
LAYOUT_B = [("a small red circle", (0.6, 0.05, 0.95, 0.4)), ("a small blue square", (0.6, 0.6, 0.95, 0.95))]
# sorted (name, shape) of the tiny layout-free model's state_dict, computed before layouts existed
LAYOUT_FREE_KEYS = "fe6b9a247b56afa6237b73f520951d41e0a7b3527b7bf5048fcff628abdcd7a4"


def tiny(layout=None, perturb=True, **kw):
    torch.manual_seed(0)
    unet = UNet(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], context_dim=32,
                heads=2, layout=layout)  # fmt: skip
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=24, tokenizer="byte")
    kw.setdefault("prediction", "eps")
    model = TextToImageDiffusion(unet, text, image_size=8, **kw).eval()
    if perturb:  # leave the zero-initialised output layer (and gates), so that outputs depend on the inputs
        with torch.no_grad():
            for p in model.ema_denoiser.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(layouts, captions=None):
    boxes, phrases, mask = pad_layouts(layouts)
    b = len(layouts)
    return {"image": torch.rand(b, 3, 8, 8) * 2 - 1, "caption": captions or ["two objects"] * b,
            "boxes": boxes, "box_phrases": phrases, "box_mask": mask}  # fmt: skip


def _keys_digest(model) -> str:
    return hashlib.sha256(
        repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()]).encode()
    ).hexdigest()


def test_grounding_tokens_reach_the_cross_attention_and_depend_on_the_boxes():
    model = tiny("tokens", layout_drop_prob=0.0)
    seen, contexts = [], []
    model.denoiser.grounding.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    block = next(m for m in model.denoiser.modules() if type(m).__name__ == "AttentionBlock")
    block.cross_attn.register_forward_hook(lambda m, i, o: contexts.append(i[1].shape[1]))
    one_object = [LAYOUT_A[:1], LAYOUT_A]  # a variable number of objects, padded
    for layouts in (one_object, [LAYOUT_B[:1], LAYOUT_B]):
        torch.manual_seed(0)
        model.loss(_batch(layouts), cond_drop_prob=0.0)
    a, b = seen
    assert a.shape == (2, 2, 32)
    assert torch.all(a[0, 1] == 0) and a[0, 0].abs().sum() > 0  # the padded object gives no token
    assert not torch.allclose(a[:, 0], b[:, 0]) and torch.equal(
        a[1, 1], b[1, 1]
    )  # only the moved box's token
    n = model.encode(["two objects"]).tokens.shape[1]
    assert contexts[0] == 1 + n + 2  # null + caption tokens + one grounding token per object


def test_moving_a_box_changes_the_image_and_without_a_layout_boxes_do_not_matter():
    model = tiny("tokens")
    prompts = ["two objects"]
    a = model.generate(prompts, seed=0, steps=4, layout=[LAYOUT_A])
    assert torch.equal(a, model.generate(prompts, seed=0, steps=4, layout=[LAYOUT_A]))
    assert (a - model.generate(prompts, seed=0, steps=4, layout=[LAYOUT_B])).abs().max() > 1e-3
    # no layout: the caption alone, as before
    plain = model.generate(prompts, seed=0, steps=4)
    assert (plain - a).abs().max() > 1e-3
    no_objects = model.generate(prompts, seed=0, steps=4, layout=[[]])
    assert torch.allclose(no_objects, plain, atol=1e-5)
    # a dropped layout (all masked, as in training and guidance's unconditional branch) ignores its boxes
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([500])
    text = model.encode(prompts, ema=True)
    outs = []
    for layout in (LAYOUT_A, LAYOUT_B):
        cond = model.generation_layout(prompts, [layout], ema=True)
        outs.append(model.ema_denoiser(x, t, text, **model.unconditional(cond)))
        assert cond["box_mask"].all() and not model.unconditional(cond)["box_mask"].any()
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(outs[0], model.ema_denoiser(x, t, text), atol=1e-5)  # = no layout at all
    # and "plan": the planner's boxes for a shapes caption
    caption = "a red circle to the left of a blue square"
    planned = model.generate([caption], seed=0, steps=3, layout="plan")
    assert torch.equal(planned, model.generate([caption], seed=0, steps=3, layout=[R.plan_layout(caption)]))


def test_gated_layout_starts_as_the_layout_free_model_and_uses_the_boxes_once_its_gates_open():
    free = tiny(None)
    gated = tiny("gated", perturb=False)
    missing, unexpected = gated.load_state_dict(free.state_dict(), strict=False)
    assert not unexpected and all(".grounding." in k or ".fuser." in k for k in missing)
    ref = free.generate(["two objects"], seed=0, steps=4)
    assert torch.equal(gated.generate(["two objects"], seed=0, steps=4, layout=[LAYOUT_A]), ref)  # gates at 0
    with torch.no_grad():
        for name, p in gated.ema_denoiser.named_parameters():
            if ".fuser." in name or ".grounding." in name:
                p.add_(torch.randn_like(p) * 0.05) if not name.endswith("gate") else p.fill_(0.5)
    a = gated.generate(["two objects"], seed=0, steps=4, layout=[LAYOUT_A])
    assert (a - gated.generate(["two objects"], seed=0, steps=4, layout=[LAYOUT_B])).abs().max() > 1e-3
    assert torch.equal(gated.generate(["two objects"], seed=0, steps=4), ref)  # no layout: no fuser


def test_layout_dropout_in_training_and_none_in_validation():
    model = tiny("tokens", perturb=False, layout_drop_prob=1.0).train()
    masks = []
    model.denoiser.grounding.register_forward_hook(lambda m, i, o: masks.append(i[2].clone()))
    batch = _batch([LAYOUT_A, LAYOUT_B])
    model.loss(batch)
    assert not masks[-1].any()  # all dropped
    model.loss(batch, cond_drop_prob=0.0)  # validation keeps every layout
    assert masks[-1].all()
    model.layout_drop_prob = 0.0
    torch.manual_seed(1)
    model.loss(batch, cond_drop_prob=1.0)  # a dropped caption drops its layout
    assert not masks[-1].any()
    with pytest.raises(ConfigError, match="layouts true"):
        model.loss({"image": batch["image"], "caption": batch["caption"]})


def test_a_layout_free_model_is_unchanged_and_its_checkpoint_loads_and_generates_identically(tmp_path):
    model = tiny(None, perturb=False, ema_decay=0.5)
    assert _keys_digest(model) == LAYOUT_FREE_KEYS
    assert not any("grounding" in k or "fuser" in k for k in model.state_dict())
    batch = {
        "image": torch.rand(4, 3, 8, 8) * 2 - 1,
        "caption": list("abcd"),
        "key": list("abcd"),
        "meta": [{}] * 4,
    }
    trainer = Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader([batch] * 2, batch_size=None))
    path = os.path.join(tmp_path, "m.ckpt")
    trainer.save_checkpoint(path)
    loaded = TextToImageDiffusion.load_from_checkpoint(path, weights_only=False).eval()
    assert loaded.layout is None
    model.eval()
    assert torch.equal(model.generate(["a"], seed=1, steps=3), loaded.generate(["a"], seed=1, steps=3))
    with pytest.raises(ValueError, match="layout-conditioned"):
        loaded.generate(["a"], seed=1, steps=3, layout=[LAYOUT_A])
    # a layout batch given to a layout-free model: the boxes are ignored
    boxed = {**_batch([LAYOUT_A]), "image": batch["image"][:1], "caption": ["a"]}
    torch.manual_seed(0)
    with_boxes = loaded.loss(boxed)
    torch.manual_seed(0)
    assert torch.equal(with_boxes, loaded.loss({"image": batch["image"][:1], "caption": ["a"]}))


def test_the_datamodule_gives_each_scene_its_true_boxes_and_by_default_none(tmp_path):
    common = dict(root=str(tmp_path / "d"), resolution=16, num_train=40, num_val=8, shard_size=20, num_workers=0,
                  seed=0, shuffle_buffer=8, batch_size=6)  # fmt: skip
    dm = ShapesDataModule(**common, layouts=True)
    dm.setup("fit")
    it = iter(dm.train_stream)
    samples = [next(it) for _ in range(18)]
    counts = set()
    for i in range(0, 18, 6):
        batch = collate(samples[i : i + 6])
        assert batch["boxes"].shape[:2] == batch["box_mask"].shape
        for j, key in enumerate(batch["key"]):
            attrs, objects = R.replay_scene(key, 0, S.DATA_VERSION)
            assert attrs == batch["meta"][j]
            truth = R.true_boxes(objects)
            n = int(batch["box_mask"][j].sum())
            counts.add(n)
            assert n == len(truth) and batch["box_mask"][j, :n].all()
            assert batch["box_phrases"][j][:n] == [p for p, _ in truth]
            assert torch.allclose(
                batch["boxes"][j, :n], torch.tensor([b for _, b in truth], dtype=torch.float32)
            )
            assert not batch["boxes"][j, n:].any() and all(p == "" for p in batch["box_phrases"][j][n:])
    assert len(counts) > 1  # scenes with different numbers of objects were padded together
    val = next(iter(dm.val_dataloader()))
    assert val["box_mask"].any(1).all()
    plain = ShapesDataModule(**common)
    plain.setup("fit")
    assert "layout" not in next(iter(plain.train_stream))
    assert "boxes" not in next(iter(plain.val_dataloader()))


def test_bad_layout_options_are_clear_errors_naming_the_option():
    with pytest.raises(ValueError, match="layouts"):
        ShapesDataModule(root="unused", layouts="yes")
    with pytest.raises(ValueError, match="layouts.*hflip|hflip.*layouts"):
        ShapesDataModule(root="unused", layouts=True, hflip=True)
    with pytest.raises(ValueError, match="layout must be null, tokens or gated"):
        UNet(base_channels=16, channel_mult=[1], attention_levels=[0], context_dim=32, layout="boxes")
    with pytest.raises(ConfigError, match="layout_drop_prob"):
        tiny("tokens", perturb=False, layout_drop_prob=1.5)
    model = tiny("tokens", perturb=False)
    with pytest.raises(ValueError, match="layout"):
        model.generate(["a"], seed=0, steps=2, layout="planned")
    with pytest.raises(ValueError, match="one per prompt"):
        model.generate(["a", "b"], seed=0, steps=2, layout=[LAYOUT_A])


def test_a_trained_model_draws_its_object_where_the_box_is():
    """One caption, two images: a red block in the top left or the bottom right quadrant, told
    apart only by the box; after training, each box generates its own image."""
    images, layouts = [], []
    for r, c in ((0, 0), (1, 1)):
        img = -torch.ones(3, 8, 8)
        img[0, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] = 1.0
        images.append(img)
        layouts.append([("a red block", (c / 2, r / 2, c / 2 + 0.5, r / 2 + 0.5))])
    images = torch.stack(images)
    model = tiny("tokens", perturb=False, prediction=None, cond_drop_prob=0.0, layout_drop_prob=0.0,
                 ema_decay=0.0).train()  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = {**_batch(layouts * 2, ["a red block"] * 4), "image": images.repeat(2, 1, 1, 1)}
    torch.manual_seed(0)
    for _step in range(100):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    model.ema_denoiser.load_state_dict(model.denoiser.state_dict())
    model.ema_text_encoder.load_state_dict(model.text_encoder.state_dict())
    out = model.eval().generate(["a red block"] * 2, seed=0, guidance_scale=1.0, layout=layouts)
    dist = torch.cdist(out.flatten(1), images.flatten(1))  # (generated, target)
    assert torch.all(dist.diagonal() < 0.5 * torch.dist(images[0], images[1])), (
        dist
    )  # near its own target only


def test_a_layout_model_trains_in_the_trainer_and_its_checkpoint_round_trips(tmp_path):
    model = tiny("gated", perturb=False, ema_decay=0.5)
    batch = {**_batch([LAYOUT_A, LAYOUT_B[:1]]), "key": ["a", "b"], "meta": [{}, {}]}
    trainer = Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    trainer.fit(model, train_dataloaders=DataLoader([batch] * 2, batch_size=None))
    gates = [p for n, p in model.denoiser.named_parameters() if n.endswith("gate")]
    assert gates and all(g != 0 for g in gates)  # the gates opened: they learn from the first step
    path = os.path.join(tmp_path, "layout.ckpt")
    trainer.save_checkpoint(path)
    loaded = TextToImageDiffusion.load_from_checkpoint(path, weights_only=False).eval()
    assert loaded.layout == "gated"
    model.eval()
    for layout in ([LAYOUT_A], None):
        assert torch.equal(
            model.generate(["two objects"], seed=2, steps=3, layout=layout),
            loaded.generate(["two objects"], seed=2, steps=3, layout=layout),
        )
