"""CLIP: retrieval recall, the clamped temperature, four captions that retrieve their own images
after overfitting, loading from a checkpoint with no trainer, and the shapes config through the CLI."""

import json
import math
import os

import pytest
import torch
from conftest import BLOCK_CAPTIONS, block_images, fit_and_save
from test_cli import ROOT, run_cli
from torch.utils.data import DataLoader

from lightning_modules.clip import CLIP, load_clip, retrieval_recall
from networks.clip import ImageTower
from networks.errors import ConfigError, MissingFileError
from networks.text_encoders import TransformerTextEncoder


def _clip(**kw):
    torch.manual_seed(0)
    image = ImageTower(image_size=16, channels=8, channel_mult=(1, 2, 2), feature_channels=8, width=32)
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0))
    return CLIP(image, text, embed_dim=16, **kw)


def _loader(steps):
    return DataLoader([{"image": block_images(), "caption": list(BLOCK_CAPTIONS)}] * steps, batch_size=None)


def test_retrieval_recall_on_a_hand_made_similarity():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # pairs 1 and 2 swapped
    r = retrieval_recall(image, text, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["t2i_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == 1.0  # each swapped pair is second; a tie (0 = 0) does not push it down
    text[1], text[2] = torch.tensor([0, 0.9, 0.44]), torch.tensor([0, 0.3, 0.95])  # now each its own best
    assert retrieval_recall(image, text, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_each_caption_retrieves_its_own_image_after_overfitting(loss, tmp_path):
    model = _clip(loss=loss)
    path = fit_and_save(model, _loader(120), 120, str(tmp_path / "clip.ckpt"))
    model.eval()
    with torch.no_grad():
        r = retrieval_recall(model.encode_image(block_images()), model.encode_text(BLOCK_CAPTIONS), ks=(1,))
    assert r == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    frozen = load_clip(path)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        assert torch.allclose(frozen.encode_text(BLOCK_CAPTIONS), model.encode_text(BLOCK_CAPTIONS))
        features = frozen.encode_image(block_images())
        larger = frozen.encode_image(torch.nn.functional.interpolate(block_images(), scale_factor=2))  # 32 px in
    assert torch.allclose(features.norm(dim=-1), torch.ones(4))
    assert retrieval_recall(larger, frozen.encode_text(BLOCK_CAPTIONS), ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}


def test_temperature_starts_at_one_over_007_and_stays_clamped_at_100(tmp_path):
    model = _clip()
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) is far above 100
    fit_and_save(model, _loader(1), 1, str(tmp_path / "c.ckpt"))
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_siglip_starts_as_open_clip_does_at_scale_10_and_bias_minus_10():
    model = _clip(loss="siglip")
    assert math.isclose(model.logit_scale.exp().item(), 10.0, rel_tol=1e-6) and model.logit_bias.item() == -10.0
    assert math.isclose(_clip(loss="siglip", init_logit_scale=0.0).logit_scale.item(), 0.0)


def test_weight_decay_is_open_clips_every_matrix_and_kernel_but_no_gain_bias_or_scale():
    model = _clip(loss="siglip", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1))
    groups = model.configure_optimizers()
    groups = (groups["optimizer"] if isinstance(groups, dict) else groups).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert any(p.ndim == 4 for n, p in model.named_parameters() if n in decayed)  # conv kernels decay
    assert {"logit_scale", "logit_bias"} <= kept and all(p.ndim < 2 for n, p in model.named_parameters() if n in kept)


def test_bad_clip_checkpoints_are_clear_errors(tiny_autoencoders, tmp_path):
    with pytest.raises(MissingFileError, match="model.init_args.clip: CLIP checkpoint"):
        load_clip(str(tmp_path / "none.ckpt"), option="model.init_args.clip")
    with pytest.raises(ConfigError, match="is not a CLIP checkpoint"):
        load_clip(tiny_autoencoders["vq"])
    with pytest.raises(ConfigError, match="'clip' or 'siglip'"):
        _clip(loss="infonce")


def test_shapes_config_runs_fast_dev_run(tmp_path):
    args = ["fit", "--config", os.path.join(ROOT, "configs", "clip", "clip_shapes.yaml"), "--trainer.fast_dev_run", "2",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--data.init_args.root", str(tmp_path / "shapes"), "--data.init_args.num_train", "40",
            "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert "max_steps=2` reached" in proc.stdout + proc.stderr


def test_the_clip_text_tower_conditions_diffusion_frozen_and_out_of_its_checkpoint(tmp_path):
    from lightning_modules.clip import CLIPTextEncoder

    clip = _clip()
    path = fit_and_save(clip, _loader(2), 2, str(tmp_path / "clip.ckpt"))
    adapter = CLIPTextEncoder(path)
    clip.eval()
    out = adapter(BLOCK_CAPTIONS)
    assert out.tokens.shape[:2] == out.mask.shape and out.pooled.shape == (4, adapter.dim)
    assert torch.equal(out.pooled, clip.text_tower(BLOCK_CAPTIONS).pooled)
    projected = CLIPTextEncoder(path, projected=True)(BLOCK_CAPTIONS).pooled
    assert torch.allclose(projected, clip.encode_text(BLOCK_CAPTIONS))
    runs = tmp_path / "runs"
    run_cli(["fit", "--config", os.path.join(ROOT, "configs", "diffusion", "shapes.yaml"), "--trainer.fast_dev_run", "2",
             "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false",
             "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
             "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
             "--data.init_args.root", str(tmp_path / "shapes"), "--data.init_args.num_train", "40",
             "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20",
             "--model.init_args.text_encoder", "lightning_modules.clip.CLIPTextEncoder",
             "--model.init_args.text_encoder.init_args.path", path,
             "--model.init_args.denoiser.init_args.context_dim", "32"], tmp_path)  # fmt: skip
    # a method with the adapter: the CLIP's weights are not in its state dict, and it loads from the path
    from lightning_modules.diffusion import TextToImageDiffusion
    from networks.unet import UNet

    unet = UNet(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], context_dim=32, heads=2)
    model = TextToImageDiffusion(unet, CLIPTextEncoder(path), image_size=16)
    assert not model.text_trainable and not any(k.startswith("text_encoder.") for k in model.state_dict())
    with pytest.raises(MissingFileError, match="text_encoder.init_args.path"):
        CLIPTextEncoder(str(tmp_path / "none.ckpt"))


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _open_clip_pair():
    from networks.open_clip_towers import OpenCLIPImageTower, OpenCLIPTextTower

    torch.manual_seed(0)
    return OpenCLIPImageTower("ViT-B-32", overrides=TINY_OPEN_CLIP), OpenCLIPTextTower("ViT-B-32", overrides=TINY_OPEN_CLIP)


def test_open_clip_towers_train_as_clip_and_their_weights_load_from_a_local_file(tmp_path):
    import open_clip

    image, text = _open_clip_pair()
    out = text(["a red square", "a blue circle on the left"])
    assert out.tokens.shape == (2, 12, 16) and out.pooled.shape == (2, 16) and text.dim == image.dim == 16
    assert out.mask.sum(1).tolist() == [5, 8]  # start, words, end
    assert torch.allclose(out.tokens[1, 7], out.pooled[1], atol=1e-6)  # pooled: the end token's state
    model = CLIP(image, text, embed_dim=None, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0))
    fit_and_save(model, _loader(80), 80, str(tmp_path / "c.ckpt"))
    model.eval()
    with torch.no_grad():
        r = retrieval_recall(model.encode_image(block_images()), model.encode_text(BLOCK_CAPTIONS), ks=(1,))
    assert r == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    # the trained towers as an open_clip checkpoint file -> the same features from a fresh pair
    full = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_OPEN_CLIP)
    full.visual.load_state_dict(image.visual.state_dict())
    full.load_state_dict({k: v for k, v in text.model.state_dict().items()}, strict=False)
    torch.save({"state_dict": full.state_dict()}, tmp_path / "open_clip.pt")
    from networks.open_clip_towers import OpenCLIPImageTower, OpenCLIPTextTower

    image2 = OpenCLIPImageTower("ViT-B-32", weights=str(tmp_path / "open_clip.pt"), overrides=TINY_OPEN_CLIP)
    text2 = OpenCLIPTextTower("ViT-B-32", weights=str(tmp_path / "open_clip.pt"), overrides=TINY_OPEN_CLIP)
    with torch.no_grad():
        assert torch.allclose(image2.eval()(block_images()), image.eval()(block_images()), atol=1e-5)
        assert torch.allclose(text2(BLOCK_CAPTIONS).pooled, text(BLOCK_CAPTIONS).pooled, atol=1e-5)


def test_open_clip_bad_names_and_missing_weights_are_clear_errors(tmp_path):
    from networks.open_clip_towers import OpenCLIPImageTower, OpenCLIPTextTower

    with pytest.raises(ConfigError, match=r"image_tower.init_args.name: open_clip has no model 'ViT-Q-99'.*ViT-"):
        OpenCLIPImageTower("ViT-Q-99")
    with pytest.raises(MissingFileError, match=r"text_tower.init_args.weights: .*not found.*Nothing is downloaded"):
        OpenCLIPTextTower("ViT-B-32", weights=str(tmp_path / "absent.bin"), overrides=TINY_OPEN_CLIP)
    image, text = _open_clip_pair()
    with pytest.raises(ConfigError, match="embed_dim is null but the towers' sizes differ"):
        CLIP(ImageTower(image_size=16, channels=8, channel_mult=(1, 2, 2), feature_channels=8, width=24), text, embed_dim=None)


@pytest.mark.parametrize("tower", ["byte", "bpe", "open_clip"])
def test_a_prompt_longer_than_the_context_is_truncated_with_a_warning(tower):
    long = "a red square on the left " * 20
    encoder = _open_clip_pair()[1] if tower == "open_clip" else TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer=tower)
    with pytest.warns(UserWarning, match=r"1 caption\(s\) longer than the text tower's (12|16) tokens were truncated"):
        out = encoder(["a red square", long])
    assert out.mask[1].all() and out.pooled.isfinite().all()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(["a red square"])  # a short one: no warning
        encoder([long])  # once per encoder: a training run does not repeat it every batch


@pytest.mark.slow
def test_gpu_shards_config_trains_under_two_process_ddp_on_open_clip_towers(shapes16, tmp_path):
    """The GPU config's DDP strategy on two CPU processes (gloo), open_clip's ViT-B-32 shrunk to
    16 px: both ranks step together to max_steps and the validation's recall over all ranks'
    features chooses the best checkpoint."""
    tiny = json.dumps(TINY_OPEN_CLIP)
    runs = tmp_path / "runs"
    run_cli(["fit", "--config", os.path.join(ROOT, "configs", "clip", "clip_shards_gpu.yaml"), "--run_name", "ddp",
             "--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false",
             "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
             "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
             "--data.init_args.train_shards", os.path.join(shapes16, "train"),
             "--data.init_args.val_shards", os.path.join(shapes16, "val"), "--data.init_args.val_samples", "8",
             "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
             "--model.init_args.lr_scheduler.init_args.total_steps", "10",
             "--model.init_args.image_tower.init_args.overrides", tiny,
             "--model.init_args.text_tower.init_args.overrides", tiny], tmp_path, timeout=600)  # fmt: skip
    ckpt = torch.load(runs / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    scores = [s["best_model_score"] for k, s in ckpt["callbacks"].items() if "retrieval_t2i_r1" in k]
    assert scores and 0.0 <= float(scores[0]) <= 1.0
