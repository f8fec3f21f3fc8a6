"""unCLIP's diffusion prior network: the order it reads, its causal and padding masks."""

import torch

from networks.unclip import DiffusionPrior


def _inputs(b=2, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 3:] = False  # the second caption has three real tokens
    return (torch.randn(b, 8, generator=g), torch.tensor([10, 900]), torch.randn(b, n, 12, generator=g), mask,
            torch.randn(b, 8, generator=g))  # fmt: skip


def _prior():
    torch.manual_seed(0)
    return DiffusionPrior(embed_dim=8, token_dim=12, width=32, depth=2, heads=4, max_tokens=16).eval()


def _run_blocks(prior, x, mask):
    for block in prior.blocks:
        x = block(x, mask)
    return prior.norm(x)


def test_the_causal_mask_keeps_each_position_from_seeing_later_ones_and_the_query_reads_every_real_one():
    """Each position of the sequence (tokens, text embedding, timestep, noised embedding, query),
    perturbed alone: nothing before it changes, and the query's output (the prediction, row -1)
    changes, unless the position is a padding token of the caption."""
    prior = _prior()
    noised, t, tokens, mask, text = _inputs()
    n = tokens.shape[1]
    real = torch.cat([mask, torch.ones(2, 4, dtype=torch.bool)], dim=1)  # (b, n + 4): the keys that exist
    with torch.no_grad():
        x, attend = prior.sequence(noised, t, tokens, mask, text)
        base = _run_blocks(prior, x, attend)
        assert torch.allclose(base, prior.hidden(noised, t, tokens, mask, text))  # the path prior.forward takes
        for p in range(n + 4):
            moved = x.clone()
            moved[:, p] += torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(p))
            out = _run_blocks(prior, moved, attend)
            assert torch.allclose(out[:, :p], base[:, :p], atol=1e-6), p  # the future is not seen
            for i in range(2):
                changed = not torch.allclose(out[i, -1], base[i, -1], atol=1e-5)
                assert changed == bool(real[i, p]), (p, i)  # the query reads every real position, no padding
    # and through the inputs: the noised embedding (after tokens, text embedding and timestep)
    # changes the query's output and nothing before its own position
    with torch.no_grad():
        a = prior.hidden(noised, t, tokens, mask, text)
        b = prior.hidden(noised + 1.0, t, tokens, mask, text)
    assert torch.allclose(a[:, : n + 2], b[:, : n + 2])
    assert (a[:, -1] - b[:, -1]).abs().amax(-1).min() > 1e-3


def test_padding_tokens_are_not_read_and_an_empty_caption_stays_finite():
    prior = _prior()
    noised, t, tokens, mask, text = _inputs()
    changed = tokens.clone()
    changed[1, 3:] += 5.0  # the second caption's padding
    with torch.no_grad():
        a, b = prior(noised, t, tokens, mask, text), prior(noised, t, changed, mask, text)
        assert torch.allclose(a, b, atol=1e-6)
        empty = prior(noised, t, tokens, torch.zeros_like(mask), text)
    assert torch.isfinite(empty).all() and empty.shape == (2, 8)


def test_the_prediction_depends_on_timestep_text_and_tokens():
    prior = _prior()
    noised, t, tokens, mask, text = _inputs()
    with torch.no_grad():
        base = prior(noised, t, tokens, mask, text)
        for other in (prior(noised, t.flip(0), tokens, mask, text), prior(noised, t, tokens, mask, -text),
                      prior(noised, t, tokens * 0, mask, text)):  # fmt: skip
            assert not torch.allclose(base, other)


# ---------------------------------------------------------------------- the modules (tiny CLIP of conftest)
import os  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import BLOCK_CAPTIONS, block_images, fit_and_save  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_modules.unclip import UnCLIP, UnCLIPDecoder, UnCLIPPrior, slerp  # noqa: E402
from networks.errors import ConfigError, MissingFileError  # noqa: E402
from networks.text_encoders import TextEncoding, TransformerTextEncoder  # noqa: E402
from networks.unet import UNet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(steps):
    return DataLoader([{"image": block_images(), "caption": list(BLOCK_CAPTIONS)}] * steps, batch_size=None)


def _tiny_prior(clip, **kw):
    torch.manual_seed(0)
    kw = {"width": 32, "depth": 2, "heads": 2, "timesteps": 100, "sample_steps": 10, "cond_drop_prob": 0.1,
          "optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0), **kw}  # fmt: skip
    return UnCLIPPrior(clip, **kw)


def _tiny_decoder(clip, **kw):
    torch.manual_seed(0)
    unet = UNet(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], context_dim=32, heads=2)
    text = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")
    kw = {"image_size": 16, "timesteps": 100, "sample_steps": 10, "guidance_scale": 1.0,
          "optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0), **kw}  # fmt: skip
    return UnCLIPDecoder(unet, text, clip, **kw)


@pytest.fixture(scope="module")
def trained(tiny_methods, tmp_path_factory):
    """A tiny prior and decoder fitted on the four block images with the conftest's tiny CLIP."""
    root = tmp_path_factory.mktemp("unclip")
    clip = tiny_methods["clip"]
    prior = fit_and_save(_tiny_prior(clip), _blocks(300), 300, str(root / "prior.ckpt"))
    decoder = fit_and_save(_tiny_decoder(clip, ema_decay=0.9), _blocks(400), 400, str(root / "decoder.ckpt"))
    return {"clip": clip, "prior": prior, "decoder": decoder}


def test_the_prior_overfitted_on_four_captions_samples_the_embedding_of_each_captions_image(trained):
    prior = UnCLIPPrior.load_from_checkpoint(trained["prior"], weights_only=False).eval()
    true = prior.clip_image(block_images())  # (4, d)
    sampled = prior.sample(list(BLOCK_CAPTIONS), seed=[0, 1, 2, 3], candidates=1, use_ema=False)
    similarity = sampled @ true.T  # row i: caption i's sample against every image
    assert similarity.argmax(1).tolist() == [0, 1, 2, 3], similarity
    assert torch.allclose(sampled.norm(dim=-1), torch.ones(4), atol=1e-5)  # unit embeddings, as CLIP's
    # the random-init prior does not: the result comes from training
    fresh = _tiny_prior(trained["clip"]).eval().sample(list(BLOCK_CAPTIONS), seed=[0, 1, 2, 3], candidates=1)
    assert (fresh @ true.T).diagonal().mean() < similarity.diagonal().mean() - 0.2


def test_best_of_k_keeps_the_candidate_most_similar_to_the_caption(trained):
    prior = _tiny_prior(trained["clip"]).eval()  # an untrained prior: its candidates differ a lot
    captions = list(BLOCK_CAPTIONS) * 2
    chosen, drawn = prior.sample(captions, seed=list(range(8)), candidates=2, return_candidates=True)
    _, text = prior.clip_text(captions)
    scores = (drawn * text[:, None]).sum(-1)  # (8, 2)
    best = scores.argmax(1)
    assert torch.equal(chosen, drawn[torch.arange(8), best])
    assert 0 < best.sum() < 8  # both positions win somewhere: the choice is made, not the first taken
    # each caption's draws come from its own seed: the same caption and seed in another batch
    alone = prior.sample([captions[5]], seed=[5], candidates=2)
    assert torch.allclose(alone[0], chosen[5], atol=1e-5)


def test_the_decoder_reads_the_image_embedding_and_with_both_conditions_dropped_is_the_unconditional_network(
    tiny_methods,
):
    decoder = _tiny_decoder(tiny_methods["clip"]).eval()
    net = decoder.denoiser
    with torch.no_grad():
        for p in net.parameters():  # leave the zero-initialised output layer
            p.add_(torch.randn_like(p) * 0.05)
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 70])
        e = F.normalize(torch.randn(2, decoder.embed_dim), dim=-1)
        keep = torch.ones(2, dtype=torch.bool)
        text = decoder.encode(["a red square", "a blue square"])
        a, b = net(x, t, text, e, keep), net(x, t, text, e.flip(0), keep)
        assert (a - b).abs().amax() > 1e-3  # the embedding changes the output
        empty = decoder.encode(["", ""])
        dropped = net(x, t, empty, e, torch.zeros(2, dtype=torch.bool))
        plain = net.denoiser(x, t, empty)  # the UNet with the empty caption and nothing else
        assert torch.allclose(dropped, plain, atol=1e-6)
    # guidance's unconditional branch drops the embedding; training drops it at its rate
    cond = decoder.denoiser_inputs(2, 0, {"image_embed": e})
    assert cond["image_keep"].all() and not decoder.unconditional(cond)["image_keep"].any()
    decoder.train()
    torch.manual_seed(0)
    kept = torch.cat([decoder.conditioning({"image": block_images(4)})["image_keep"] for _ in range(100)])
    assert 0.05 < 1 - kept.float().mean() < 0.15  # image_drop_prob 0.1


def test_a_variation_is_nearer_its_source_than_the_other_images_and_interpolation_ends_at_both(trained):
    model = UnCLIP(trained["prior"], trained["decoder"], decoder_sampling={"steps": 10, "guidance_scale": 3.0})
    images = block_images()
    variations = model.variations(images, seed=[0, 1, 2, 3])
    similarity = model.clip.encode_image(variations) @ model.clip.encode_image(images).T
    assert similarity.argmax(1).tolist() == [0, 1, 2, 3], similarity
    ends = model.interpolate(images[0], images[2], [0.0, 0.5, 1.0], seed=7)
    alone = model.variations(images[[0, 2]], seed=[7, 7])
    assert torch.allclose(ends[0], alone[0], atol=1e-4) and torch.allclose(ends[2], alone[1], atol=1e-4)
    a, b = model.clip.encode_image(images[[0, 2]])
    assert torch.allclose(slerp(a[None], b[None], 0.5).norm(), torch.tensor(1.0), atol=1e-5)


def test_generate_follows_the_contract_and_the_caption_changes_the_image(trained):
    model = UnCLIP(trained["prior"], trained["decoder"], prior_sampling={"steps": 10},
                   decoder_sampling={"steps": 10})  # fmt: skip
    prompts = list(BLOCK_CAPTIONS)
    out = model.generate(prompts, seed=[0, 1, 2, 3])
    assert out.shape == (4, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    again = model.generate([prompts[2]], seed=[2])  # a prompt's image does not depend on its batch
    assert torch.allclose(out[2], again[0], atol=1e-4)
    similarity = model.clip.encode_image(out) @ model.clip.encode_image(block_images()).T
    # each image is nearer its own caption's block than the other blocks on average, by a margin
    # (images that ignored the caption would be one image: some row would fail), and the nearest
    # block for at least 3 of 4 (the tiny prior and decoder are not exact; which one misses moves
    # with package versions)
    own = similarity.diag()
    others = (similarity.sum(1) - own) / 3
    assert (own > others + 0.2).all(), similarity
    assert (similarity.argmax(1) == torch.arange(4)).sum() >= 3, similarity
    with pytest.raises(TypeError, match="image_embed"):
        model.generate(prompts, image_embed=None)  # the decoder's own option is not the composite's


def test_the_frozen_clip_gets_no_gradient_stays_out_of_checkpoints_and_a_bad_path_is_named(trained, tmp_path):
    before = torch.load(trained["clip"], weights_only=False)["state_dict"]
    for path, cls in ((trained["prior"], UnCLIPPrior), (trained["decoder"], UnCLIPDecoder)):
        state = torch.load(path, weights_only=False)["state_dict"]
        assert state and not any(k.startswith("clip.") for k in state)  # the path is stored, not the weights
        model = cls.load_from_checkpoint(path, weights_only=False)
        assert not any(p.requires_grad for p in model.clip.parameters())
        for name, value in model.clip.state_dict().items():  # 300-400 steps left the CLIP as it was
            assert torch.equal(value, before[name]), name
        model.train()
        assert not model.clip.training
    with pytest.raises(MissingFileError, match="CLIP checkpoint 'nowhere.ckpt' not found"):
        _tiny_prior("nowhere.ckpt")
    with pytest.raises(ConfigError, match="not a CLIP checkpoint"):
        _tiny_decoder(trained["decoder"])  # another model's checkpoint
    with pytest.raises(MissingFileError, match="model.init_args.prior"):
        UnCLIP(str(tmp_path / "none.ckpt"), trained["decoder"])
    with pytest.raises(ConfigError, match="not an UnCLIPDecoder"):
        UnCLIP(trained["prior"], trained["prior"])


def test_unclip_configs_train_through_the_cli_and_their_checkpoints_generate_together(tiny_methods, tmp_path):
    """Both configs train a step through train.py on the given CLIP; their last.ckpt files make an
    UnCLIP that generates. A CLIP path that is not there: one line naming the option, before any
    data is rendered."""
    from test_cli import run_cli

    data = ["--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.num_train", "40",
            "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20",
            "--data.init_args.root", str(tmp_path / "shapes")]  # fmt: skip
    last = {}
    for name in ("prior", "decoder"):
        config = os.path.join(ROOT, "configs", "unclip", f"{name}_shapes.yaml")
        proc = run_cli(["fit", "--config", config, "--model.init_args.clip", tiny_methods["clip"], *data,
                        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
                        "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", name,
                        "--trainer.enable_progress_bar", "false"], tmp_path)  # fmt: skip
        assert "max_steps=1` reached" in proc.stdout + proc.stderr
        last[name] = str(tmp_path / "runs" / name / "checkpoints" / "last.ckpt")
        proc = run_cli(["fit", "--config", config, "--model.init_args.clip", str(tmp_path / "missing.ckpt"),
                        "--data.init_args.root", str(tmp_path / "other")], tmp_path, expect_failure=True)  # fmt: skip
        assert "model.init_args.clip: CLIP checkpoint" in proc.stderr and "not found" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "other").exists()
    model = UnCLIP(last["prior"], last["decoder"], prior_sampling={"steps": 3}, decoder_sampling={"steps": 3})
    out = model.generate(["a red circle", "two blue squares"], seed=[0, 1])
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_the_openmoji_configs_train_a_clip_then_prior_and_decoder_on_it_through_the_cli(tmp_path):
    """The second dataset: its CLIP (the shapes CLIP config on OpenMoji's data), then unCLIP's
    prior and decoder on that CLIP, a step each, as their config headers say; both generate."""
    from test_cli import run_cli

    data = ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--data.init_args.root", str(tmp_path / "openmoji32")]  # fmt: skip
    step = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    run_cli(["fit", "--config", os.path.join(ROOT, "configs", "clip", "clip_shapes.yaml"), "--data",
             os.path.join(ROOT, "configs", "data", "openmoji32.yaml"), *data, *step, "--run_name", "clip_openmoji"],
            tmp_path)  # fmt: skip
    clip = str(tmp_path / "runs" / "clip_openmoji" / "checkpoints" / "last.ckpt")
    last = {}
    for name in ("prior", "decoder"):
        config = os.path.join(ROOT, "configs", "unclip", f"{name}_openmoji.yaml")
        proc = run_cli(["fit", "--config", config, "--model.init_args.clip", clip, *data, *step, "--run_name", name],
                       tmp_path)  # fmt: skip
        assert "max_steps=1` reached" in proc.stdout + proc.stderr
        last[name] = str(tmp_path / "runs" / name / "checkpoints" / "last.ckpt")
    model = UnCLIP(last["prior"], last["decoder"], prior_sampling={"steps": 2}, decoder_sampling={"steps": 2})
    out = model.generate(["grinning face", "улыбающееся лицо"], seed=[0, 1])
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_the_predict_config_generates_from_prior_and_decoder_checkpoints(trained, shapes16, tmp_path):
    from test_cli import run_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square\n")
    run_cli(["predict", "--config", os.path.join(ROOT, "configs", "unclip", "unclip_predict.yaml"),
             "--model.init_args.prior", trained["prior"], "--model.init_args.decoder", trained["decoder"],
             "--model.init_args.prior_sampling", "{steps: 5}", "--model.init_args.decoder_sampling", "{steps: 5}",
             "--data.init_args.root", shapes16, "--data.init_args.resolution", "16", "--data.init_args.num_train", "600",
             "--data.init_args.num_val", "64", "--data.init_args.shard_size", "100",
             "--data.init_args.predict_prompts", str(prompts), "--data.init_args.predict_seeds", "[0, 1]",
             "--trainer.default_root_dir", str(tmp_path / "runs"), "--run_name", "unclip",
             "--trainer.enable_progress_bar", "false"], tmp_path)  # fmt: skip
    out = os.path.join(tmp_path, "runs", "unclip", "predictions")
    assert len([p for p in os.listdir(out) if "seed" in p]) == 4 and "grid.png" in os.listdir(out)


def test_embeddings_pre_computed_into_shards_feed_prior_and_decoder_and_bad_members_are_skipped_and_counted(
    tiny_methods, tmp_path
):
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    from test_priors import _npy, _skip_counts

    from datamodules.text_image import TextImageDataModule
    from scripts.embed_shards import main as embed_shards

    x = block_images()

    def png(i):
        buf = io.BytesIO()
        Image.fromarray(((x[i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(buf, format="PNG")
        return buf.getvalue()

    def write(path, members_of):
        with tarfile.open(path, "w") as tar:
            for key, members in members_of.items():
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    (tmp_path / "src").mkdir()
    write(tmp_path / "src" / "shard-00000.tar",
          {f"{i:04d}": {"png": png(i % 4), "txt": BLOCK_CAPTIONS[i % 4].encode()} for i in range(8)})  # fmt: skip
    done = embed_shards(["--clip", tiny_methods["clip"], "--shards", str(tmp_path / "src"), "--out",
                         str(tmp_path / "emb"), "--image-size", "16"])  # fmt: skip
    assert done == {"with_embedding": 8, "without": 0, "shards": 1}
    prior = _tiny_prior(tiny_methods["clip"])
    d = prior.embed_dim
    bad = {"0100": _npy(np.zeros(d + 1, np.float16)), "0101": _npy(np.zeros(d, np.int16)),
           "0102": _npy(np.array([{"a": 1}], dtype=object)), "0103": None}  # fmt: skip
    write(tmp_path / "emb" / "shard-00001.tar",
          {k: {"png": png(0), "txt": b"a red square", **({"clip.npy": v} if v is not None else {})}
           for k, v in bad.items()})  # fmt: skip
    dm = TextImageDataModule(train_shards=str(tmp_path / "emb"), image_size=16, batch_size=4, num_workers=0,
                             clip_embed_dim=d, shuffle_buffer=1, train_batches_per_epoch=3)  # fmt: skip
    dm.setup("fit")
    stream = iter(dm.train_stream)
    seen = [next(stream) for _ in range(8)]
    images = torch.stack([s["image"] for s in seen])
    stored = torch.stack([s["clip_image_embed"] for s in seen])
    assert torch.allclose(stored, prior.clip_image(images), atol=2e-3)  # float16 of CLIP's own embedding
    assert _skip_counts(dm.train_stream, tmp_path / "emb" / "shard-00001.tar") == {"bad_clip_embed": 3,
                                                                                  "no_clip_embed": 1}  # fmt: skip
    # the modules use the stored embedding when the batch has one: the same loss as from the images
    batch = {"image": images[:4], "caption": [s["caption"] for s in seen[:4]]}
    decoder = _tiny_decoder(tiny_methods["clip"])
    with torch.no_grad():  # leave the zero-initialised output layer, so that the output reads its inputs
        for p in decoder.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for model in (prior, decoder):
        losses = []
        for b in (batch, {**batch, "clip_image_embed": stored[:4]}):
            torch.manual_seed(0)
            losses.append(model.loss(b))
        assert torch.allclose(losses[0], losses[1], atol=1e-3)
        torch.manual_seed(0)  # and the stored one is what is read: another embedding, another loss
        assert not torch.allclose(model.loss({**batch, "clip_image_embed": stored[:4].flip(0)}), losses[0])


def test_the_guided_pass_gives_the_unconditional_half_neither_caption_nor_image_embedding(tiny_methods):
    """Guidance's batched pass: the first half has the caption and the image embedding (its extra
    tokens attended to, its projection added to the pooled vector), the second half the empty
    caption and no embedding (``unconditional()``): what reaches the UNet, half by half."""
    decoder = _tiny_decoder(tiny_methods["clip"], guidance_scale=3.0).eval()
    prompts = ["a red square", "a blue square"]
    e = F.normalize(torch.randn(2, decoder.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    wrapper = decoder.ema_denoiser  # the network that samples
    seen = []
    hooks = [wrapper.register_forward_pre_hook(lambda m, args, kw: seen.append(("keep", kw["image_keep"].clone())),
                                               with_kwargs=True),
             wrapper.denoiser.register_forward_pre_hook(lambda m, args: seen.append(("unet", args[2])))]  # fmt: skip
    decoder.generate(prompts, seed=[0, 1], image_embed=e, steps=2)
    for h in hooks:
        h.remove()
    keeps, texts = [v for k, v in seen if k == "keep"], [v for k, v in seen if k == "unet"]
    assert len(keeps) == len(texts) >= 2  # every step one doubled batch
    caption, null = decoder.encode(prompts, ema=True), decoder.encode(["", ""], ema=True)
    n = caption.tokens.shape[1]
    added = wrapper.to_pooled(e)
    for keep, text in zip(keeps, texts):
        assert keep.tolist() == [True, True, False, False]
        cond, uncond = (TextEncoding(*(x[i : i + 2] for x in text)) for i in (0, 2))
        assert torch.equal(cond.tokens[:, :n], caption.tokens) and torch.equal(cond.mask[:, :n], caption.mask)
        assert cond.mask[:, n:].all()  # the embedding's tokens are read
        assert torch.allclose(cond.pooled, caption.pooled + added, atol=1e-6)
        assert torch.equal(uncond.tokens[:, :n], null.tokens) and torch.equal(uncond.mask[:, :n], null.mask)
        assert not uncond.mask[:, n:].any()  # the embedding's tokens are masked out
        assert torch.equal(uncond.pooled, null.pooled)  # and nothing added to the pooled vector


def test_sampling_uses_the_ema_weights_of_prior_and_decoder(trained):
    """The live weights can change at will without changing ``generate``; the EMA weights cannot."""

    def model():
        return UnCLIP(trained["prior"], trained["decoder"], prior_sampling={"steps": 5},
                      decoder_sampling={"steps": 5, "guidance_scale": 3.0})  # fmt: skip

    def shake(*modules):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in modules:
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)

    prompts, seeds = list(BLOCK_CAPTIONS), [0, 1, 2, 3]
    m = model()
    before = m.generate(prompts, seed=seeds)
    assert m.decoder.ema_text_encoder is not None  # the trainable caption encoder has an EMA too
    shake(m.prior.network, m.decoder.denoiser, m.decoder.text_encoder)
    assert torch.allclose(m.generate(prompts, seed=seeds), before, atol=1e-6)
    for ema in (lambda m: m.prior.ema_network, lambda m: m.decoder.ema_denoiser,
                lambda m: m.decoder.ema_text_encoder):  # fmt: skip
        m = model()
        shake(ema(m))
        assert (m.generate(prompts, seed=seeds) - before).abs().amax() > 1e-2


def test_the_priors_target_and_text_condition_are_the_clip_embeddings_scaled_to_norm_sqrt_d(tiny_methods, monkeypatch):
    prior = _tiny_prior(tiny_methods["clip"], cond_drop_prob=0.0)
    d = prior.embed_dim
    seen = {}
    mse = F.mse_loss

    def spy(predicted, target, *args, **kwargs):
        seen["target"] = target
        return mse(predicted, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "mse_loss", spy)
    hook = prior.network.register_forward_pre_hook(lambda m, args: seen.update(text_embed=args[4]))
    batch = {"image": block_images(), "caption": list(BLOCK_CAPTIONS)}
    prior.loss(batch)
    hook.remove()
    target, text_embed = seen["target"], seen["text_embed"]
    assert torch.allclose(target.norm(dim=-1), torch.full((4,), d**0.5), atol=1e-4)
    assert torch.allclose(target / d**0.5, prior.clip_image(batch["image"]), atol=1e-6)  # the image embedding
    assert torch.allclose(text_embed.norm(dim=-1), torch.full((4,), d**0.5), atol=1e-4)
    assert torch.allclose(text_embed / d**0.5, prior.clip_text(batch["caption"])[1], atol=1e-6)


def test_unclip_holds_one_clip_and_counts_its_parameters_once(trained):
    from evaluation.harness import parameter_count

    m = UnCLIP(trained["prior"], trained["decoder"])
    assert m.prior.clip is m.decoder.clip is m.clip

    def own(module):  # a module's parameters but its CLIP's
        return sum(p.numel() for name, p in module.named_parameters() if not name.startswith("clip."))

    clip = parameter_count(m.clip)
    assert clip > 0 and own(m.prior) > 0 and own(m.decoder) > 0
    assert parameter_count(m) == own(m.prior) + own(m.decoder) + clip
    assert len({id(p) for p in m.parameters()}) == len(list(m.parameters()))


def _clip_copy(source: str, path, origin: str | None) -> str:
    """The CLIP checkpoint ``source`` saved at ``path`` with the lineage origin ``origin`` (its own
    history otherwise); ``None``: as a CLIP from before lineage was recorded."""
    checkpoint = torch.load(source, weights_only=False)
    if origin is None:
        checkpoint.pop("clip_lineage")
    else:
        checkpoint["clip_lineage"] = {"origin": origin, "resumed": []}
    torch.save(checkpoint, path)
    return str(path)


def test_a_checkpoint_whose_clip_path_now_holds_another_clip_is_refused_naming_both_lineages(tiny_methods, tmp_path):
    import warnings

    clip = _clip_copy(tiny_methods["clip"], tmp_path / "clip.ckpt", "a" * 32)
    prior = fit_and_save(_tiny_prior(clip), _blocks(1), 1, str(tmp_path / "prior.ckpt"))
    decoder = fit_and_save(_tiny_decoder(clip), _blocks(1), 1, str(tmp_path / "decoder.ckpt"))
    recorded = torch.load(prior, weights_only=False)["frozen_clip_lineage"]
    assert recorded["origin"] == "a" * 32
    assert recorded == UnCLIPPrior.load_from_checkpoint(prior, weights_only=False).clip.lineage
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CLIP lineage.*")
        UnCLIP(prior, decoder)  # the same CLIP: no complaint
    _clip_copy(tiny_methods["clip"], tmp_path / "clip.ckpt", "b" * 32)  # another CLIP at the same path
    for cls, path in ((UnCLIPPrior, prior), (UnCLIPDecoder, decoder)):
        with pytest.raises(ConfigError, match=f"origin {'a' * 32}.*now holds a CLIP of origin {'b' * 32}") as err:
            cls.load_from_checkpoint(path, weights_only=False)
        assert "give the CLIP it was trained on" in str(err.value) and "train the" in str(err.value)
    with pytest.raises(ConfigError, match="model.init_args.prior: .*prior.ckpt: .*now holds a CLIP of origin b"):
        UnCLIP(prior, decoder)
    # the way out: the CLIP it was trained on, from another path
    original = _clip_copy(tiny_methods["clip"], tmp_path / "original.ckpt", "a" * 32)
    reloaded = UnCLIPPrior.load_from_checkpoint(prior, clip=original, weights_only=False)
    assert reloaded.clip.lineage["origin"] == "a" * 32
    # a checkpoint from before the lineage was recorded loads, with a warning
    old = torch.load(prior, weights_only=False)
    del old["frozen_clip_lineage"]
    torch.save(old, tmp_path / "old_prior.ckpt")
    with pytest.warns(UserWarning, match="predates the recorded CLIP lineage"):
        UnCLIPPrior.load_from_checkpoint(str(tmp_path / "old_prior.ckpt"), weights_only=False)
    # prior and decoder on two different CLIPs, each where it was trained
    prior_a = fit_and_save(_tiny_prior(original), _blocks(1), 1, str(tmp_path / "prior_a.ckpt"))
    decoder_b = fit_and_save(_tiny_decoder(clip), _blocks(1), 1, str(tmp_path / "decoder_b.ckpt"))
    with pytest.raises(ConfigError, match=f"trained on different CLIPs.*origin {'a' * 32}.*origin {'b' * 32}"):
        UnCLIP(prior_a, decoder_b)


def test_the_variations_benchmark_refuses_a_judge_of_unclips_lineage_and_notes_one_without(trained, tmp_path,
                                                                                          monkeypatch):  # fmt: skip
    """``benchmarks/unclip_variations.py`` applies ``evaluate.py``'s rule to its judge."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from unclip_variations import judge_check

    clip = trained["clip"]
    with pytest.raises(SystemExit, match="shares its ancestry"):
        judge_check(clip, trained["prior"], trained["decoder"])  # unCLIP's own CLIP
    origin = torch.load(clip, weights_only=False)["clip_lineage"]["origin"]
    with pytest.raises(SystemExit, match="shares its ancestry"):  # another file of the same origin
        judge_check(_clip_copy(clip, tmp_path / "resumed.ckpt", origin), trained["prior"], trained["decoder"])
    notes = judge_check(_clip_copy(clip, tmp_path / "old.ckpt", None), trained["prior"], trained["decoder"])
    assert len(notes) == 1 and "before lineage was recorded" in notes[0]
    assert judge_check(_clip_copy(clip, tmp_path / "own.ckpt", "c" * 32), trained["prior"], trained["decoder"]) == []
