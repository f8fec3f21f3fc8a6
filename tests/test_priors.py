"""Token priors: causality, the KV cache against the full pass, guidance, top-k / top-p, the
MaskGIT schedule, overfitting four captions to their own images, checkpoints that leave the
frozen autoencoder out, pre-tokenised shards, and clear errors for autoencoders that cannot work."""

import io
import math
import tarfile

import lightning as L
import numpy as np
import pytest
import torch
from conftest import BLOCK_CAPTIONS, block_images
from torch.utils.data import DataLoader

from lightning_modules.base import decay_groups
from lightning_modules.priors import AutoregressivePrior, MaskGITPrior
from networks.errors import ConfigError, MissingFileError
from networks.text_encoders import TransformerTextEncoder
from networks.transformer import (
    MaskedTokenTransformer,
    TokenTransformer,
    filter_logits,
    mask_ratio,
    masked_per_step,
    sample_from_logits,
)


def _text_encoder():
    return TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")


def _transformer(conditioning="cross", **kw):
    return TokenTransformer(32, 4, width=32, depth=2, heads=2, conditioning=conditioning, text_length=20,
                            context_dim=32, **kw)  # fmt: skip


def _ar(path, conditioning="cross", **kw):
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    text = _text_encoder() if conditioning == "cross" else None
    return AutoregressivePrior(path, _transformer(conditioning), text, **kw)


def _maskgit(path, **kw):
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    net = MaskedTokenTransformer(32, 4, width=32, depth=2, heads=2, context_dim=32)
    return MaskGITPrior(path, net, _text_encoder(), **kw)


def _fit(model, steps):
    batch = {"image": block_images(), "caption": list(BLOCK_CAPTIONS)}
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(model, DataLoader([batch] * steps, batch_size=None))
    return trainer


# ---------------------------------------------------------------------------------- the network
@pytest.mark.parametrize("conditioning", ["stream", "cross"])
def test_changing_a_token_never_changes_the_logits_before_it(conditioning):
    torch.manual_seed(0)
    net = _transformer(conditioning).eval()
    tokens = torch.randint(0, 32, (2, 16))
    text = _text_encoder()(["a red square", "a blue square"])
    ids = torch.randint(3, 200, (2, 20))
    cond = {"text_ids": ids} if conditioning == "stream" else {"text": text}
    logits, text_logits = net(tokens, **cond)
    for j in (0, 5, 14):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % 32
        after, text_after = net(changed, **cond)
        assert torch.equal(after[:, : j + 1], logits[:, : j + 1])  # token j is predicted from tokens < j
        assert not torch.allclose(after[:, j + 1 :], logits[:, j + 1 :])
        if text_logits is not None:
            assert torch.equal(text_after, text_logits)


@pytest.mark.parametrize("conditioning", ["stream", "cross"])
def test_kv_cache_gives_the_full_pass_logits_at_every_position(conditioning):
    torch.manual_seed(0)
    net = _transformer(conditioning).eval()
    tokens = torch.randint(0, 32, (3, 16))
    text = _text_encoder()(["a", "bb", "a green square"])
    ids = torch.randint(3, 200, (3, 20))
    full, _ = net(tokens, **({"text_ids": ids} if conditioning == "stream" else {"text": text}))
    caches, context = net.new_caches(), net.cached_context(text)
    h = net.run(net.embed_prefix(3, ids if conditioning == "stream" else None), context, caches)
    stepped = [net.head(h[:, -1])]
    for k in range(1, 16):
        h = net.run(net.embed_tokens(tokens[:, k - 1 : k], k - 1), context, caches)
        stepped.append(net.head(h[:, -1]))
    assert torch.allclose(torch.stack(stepped, 1), full, atol=1e-5, rtol=0)


def test_weight_decay_applies_to_linear_weights_only():
    net = _transformer("stream")
    decay, no_decay = decay_groups(net)
    linear = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear
    assert no_decay["weight_decay"] == 0.0
    names = {n for n, p in net.named_parameters() if id(p) in {id(q) for q in no_decay["params"]}}
    assert "image_embed.weight" in names and "text_pos" in names and "blocks.0.norm1.weight" in names
    assert "blocks.0.attn.q.bias" in names and "blocks.0.attn.q.weight" not in names


# ---------------------------------------------------------------------------------- sampling
def test_top_k_one_is_greedy_and_top_p_keeps_the_smallest_set_with_the_mass():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    assert torch.equal(sample_from_logits(filter_logits(logits, top_k=1), gens), logits.argmax(-1))
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # ranked: 0.5, 0.3, 0.15, 0.05
    kept = lambda p: torch.isfinite(filter_logits(probs.log()[None], top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.79) == [False, True, False, True]
    assert kept(0.81) == [False, True, True, True]
    assert kept(0.99) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]


def test_sampling_follows_the_distribution_and_repeats_under_a_seed():
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(4000, 2)
    gen = torch.Generator().manual_seed(0)
    draws = sample_from_logits(logits, gen)
    assert abs(draws.float().mean().item() - 0.75) < 0.03
    again = sample_from_logits(logits, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_guidance_scale_one_is_the_conditional_logits_exactly(tiny_autoencoders):
    torch.manual_seed(0)
    prior = _ar(tiny_autoencoders["vq"]).eval()
    c, u = torch.randn(3, 32), torch.randn(3, 32)
    assert torch.equal(prior.guided(torch.cat([c, u]), 1.0), c)
    assert torch.allclose(prior.guided(torch.cat([c, u]), 3.0), u + 3 * (c - u))
    # greedy generation at scale 1 is the greedy decoding of the conditional model alone
    tokens = prior.sample_tokens(["a red square"], None, 0.0, None, None, 1.0)
    text = prior.text_encoder(["a red square"])
    greedy = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(16):
        padded = torch.cat([greedy, torch.zeros(1, 16 - greedy.shape[1], dtype=torch.long)], 1)
        logits, _ = prior.transformer(padded, text=text)
        greedy = torch.cat([greedy, logits[:, greedy.shape[1]].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, greedy)


@pytest.mark.parametrize("conditioning", ["stream", "cross"])
def test_cached_and_uncached_generation_give_the_same_tokens_for_a_seed(tiny_autoencoders, conditioning):
    torch.manual_seed(0)
    prior = _ar(tiny_autoencoders["vq"], conditioning).eval()
    prompts = ["a red square", "a blue square", "a green square"]
    for options in ({"guidance_scale": 3.0}, {"guidance_scale": 1.0, "top_p": 0.9, "temperature": 1.5}):
        cached = prior.sample_tokens(prompts, prior.generator([1, 2, 3], "cpu"), options.get("temperature", 1.0),
                                     None, options.get("top_p"), options["guidance_scale"], use_cache=True)  # fmt: skip
        full = prior.sample_tokens(prompts, prior.generator([1, 2, 3], "cpu"), options.get("temperature", 1.0),
                                   None, options.get("top_p"), options["guidance_scale"], use_cache=False)  # fmt: skip
        assert torch.equal(cached, full)
        assert len({tuple(t.tolist()) for t in cached}) == 3  # a random model: three different samples
    # each image depends only on its own prompt and seed
    alone = prior.generate(["a blue square"], seed=[2])
    assert torch.allclose(prior.generate(prompts, seed=[1, 2, 3])[1:2], alone, atol=1e-6)


def test_maskgit_schedule_unmasks_every_token_by_the_last_step(tiny_autoencoders):
    n = 64
    for steps in (8, 12, 16):
        left = masked_per_step(n, steps)
        assert left[-1] == 0 and all(a > b for a, b in zip(left, left[1:]))
        assert left == [math.floor(math.cos(math.pi / 2 * (s + 1) / steps) * n) for s in range(steps)]
    assert mask_ratio(0.0) == 1.0 and abs(mask_ratio(1.0)) < 1e-12
    torch.manual_seed(0)
    prior = _maskgit(tiny_autoencoders["vq"]).eval()
    history = []
    tokens = prior.sample_tokens(["a red square", "a blue square"], prior.generator([0, 1], "cpu"), 6, 1.0, 4.5,
                                 3.0, history=history)  # fmt: skip
    assert (tokens < 32).all()  # no mask token is left
    assert history == [[m, m] for m in masked_per_step(16, 6)]
    # training masks ceil(cos(pi/2 r) n) tokens, at least one
    torch.manual_seed(1)
    mask = prior.random_mask(2000)
    counts = mask.sum(-1).float()
    assert counts.min() >= 1 and counts.max() <= 16
    expected = 16 * 2 / math.pi  # E[cos(pi/2 r)] n, before the ceiling
    assert expected < counts.mean() < expected + 1


def test_maskgit_never_changes_a_token_once_it_is_decided(tiny_autoencoders):
    """Each step's input (what the transformer sees) keeps every token decided at an earlier step,
    and the final tokens are the last decided values: decided tokens are never masked again."""
    torch.manual_seed(0)
    prior = _maskgit(tiny_autoencoders["vq"]).eval()
    seen = []
    forward = prior.transformer.forward
    prior.transformer.forward = lambda tokens, *a, **k: (seen.append(tokens[:3].clone()), forward(tokens, *a, **k))[1]
    final = prior.sample_tokens(["a red square", "a blue square", "a green square"], prior.generator([0, 1, 2], "cpu"),
                                8, 1.0, 4.5, 1.0)  # fmt: skip
    mask_id = prior.transformer.mask_id
    steps = [*seen, final]
    for before, after in zip(steps, steps[1:]):
        decided = before != mask_id
        assert torch.equal(after[decided], before[decided])  # still decided, same value


def test_maskgit_choice_noise_is_annealed_from_its_temperature_to_zero(tiny_autoencoders, monkeypatch):
    """MaskGIT's reference: the Gumbel noise on the confidences is choice_temperature * (1 - ratio),
    ratio = (step + 1) / steps: largest at the first step, zero at the last. And the sampler uses
    exactly this scale: with it forced to 0, sampling equals choice_temperature 0."""
    from lightning_modules import priors
    from networks.transformer import choice_noise

    assert [choice_noise(s, 4, 4.5) for s in range(4)] == [4.5 * 3 / 4, 4.5 / 2, 4.5 / 4, 0.0]
    prior = _maskgit(tiny_autoencoders["vq"]).eval()
    prompts = ["a red square", "a blue square"]
    greedy = prior.sample_tokens(prompts, prior.generator([0, 1], "cpu"), 6, 1.0, 0.0, 1.0)
    noisy = prior.sample_tokens(prompts, prior.generator([0, 1], "cpu"), 6, 1.0, 1e4, 1.0)
    assert not torch.equal(greedy, noisy)  # the choice noise matters ...
    used = []  # the scale each step of the sampler draws with: from the temperature down to 0
    monkeypatch.setattr(priors, "choice_noise", lambda step, steps, t: used.append(choice_noise(step, steps, t)) or used[-1])
    prior.sample_tokens(prompts, prior.generator([0, 1], "cpu"), 6, 1.0, 4.5, 1.0)
    assert used == [4.5 * (1 - (s + 1) / 6) for s in range(6)]
    monkeypatch.setattr(priors, "choice_noise", lambda step, steps, t: 0.0)
    assert torch.equal(prior.sample_tokens(prompts, prior.generator([0, 1], "cpu"), 6, 1.0, 1e4, 1.0), greedy)


# ---------------------------------------------------------------------------------- training
def _own_image(images, targets):
    """For each generated image, the index of the nearest target image."""
    d = (images[:, None] - targets[None]).abs().flatten(2).mean(-1)
    return d.argmin(1).tolist()


@pytest.mark.parametrize("kind", ["ar_cross", "ar_stream", "maskgit"])
def test_each_of_four_captions_generates_its_own_image_after_overfitting(tiny_autoencoders, kind):
    torch.manual_seed(0)
    path = tiny_autoencoders["vq"]
    model = _maskgit(path) if kind == "maskgit" else _ar(path, kind.split("_")[1])
    _fit(model, 300 if kind == "maskgit" else 150)
    model.eval()
    targets = model.autoencoder.reconstruct(block_images())
    images = model.generate(list(BLOCK_CAPTIONS), seed=[0, 1, 2, 3], temperature=0.5)
    assert _own_image(images, targets) == [0, 1, 2, 3]
    # greedy tokens of the conditional model are the autoencoder's own codes of each image
    codes = model.autoencoder.encode(block_images())[1].flatten(1)
    if kind == "maskgit":
        tokens = model.sample_tokens(list(BLOCK_CAPTIONS), None, 8, 0.0, 0.0, 1.0)
    else:
        tokens = model.sample_tokens(list(BLOCK_CAPTIONS), None, 0.0, None, None, 1.0)
    assert (tokens == codes).float().mean() > 0.9


def test_checkpoint_leaves_the_autoencoder_out_and_loads_from_its_path(tiny_autoencoders, tmp_path):
    torch.manual_seed(0)
    model = _ar(tiny_autoencoders["vq"], "stream")
    trainer = _fit(model, 3)
    path = str(tmp_path / "prior.ckpt")
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any(k.startswith("autoencoder.") for k in state)
    assert state.keys() == {k for k in model.state_dict()}
    loaded = AutoregressivePrior.load_from_checkpoint(path, weights_only=False).eval()
    model.eval()
    assert not loaded.autoencoder.training and not any(
        p.requires_grad for p in loaded.autoencoder.parameters()
    )
    assert torch.equal(loaded.generate(["a red square"], seed=5), model.generate(["a red square"], seed=5))


def test_the_autoencoder_stays_frozen_and_in_eval_mode_while_the_prior_trains(tiny_autoencoders):
    torch.manual_seed(0)
    model = _maskgit(tiny_autoencoders["vq"])
    before = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    model.train()
    assert not model.autoencoder.training and model.transformer.training
    _fit(model, 3)
    after = model.autoencoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_autoencoders_that_cannot_work_are_clear_errors(tiny_autoencoders, tmp_path):
    with pytest.raises(MissingFileError, match="model.init_args.autoencoder"):
        _ar(str(tmp_path / "none.ckpt"))
    with pytest.raises(ConfigError, match="KLAutoencoder.*VQ autoencoder"):
        _ar(tiny_autoencoders["kl"])
    with pytest.raises(ConfigError, match="vocab_size is 64 .* 32 codes"):
        AutoregressivePrior(tiny_autoencoders["vq"], TokenTransformer(64, 4, width=32, depth=1, heads=2, context_dim=32),
                            _text_encoder())  # fmt: skip
    with pytest.raises(ConfigError, match="side is 8 .* 4 x 4"):
        MaskGITPrior(tiny_autoencoders["vq"], MaskedTokenTransformer(32, 8, width=32, depth=1, heads=2, context_dim=32),
                     _text_encoder())  # fmt: skip


# ---------------------------------------------------------------------------------- pre-tokenised shards
def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_pre_tokenised_shards_feed_the_prior_and_bad_members_are_skipped_and_counted(
    tiny_autoencoders, tmp_path
):
    from datamodules.text_image import TextImageDataModule
    from scripts.tokenize_shards import main as tokenize

    # shards of the four block images, tokenised by the script
    src = tmp_path / "src"
    src.mkdir()
    from PIL import Image

    x = block_images()
    with tarfile.open(src / "shard-00000.tar", "w") as tar:
        for i in range(8):
            img = ((x[i % 4].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", BLOCK_CAPTIONS[i % 4].encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    done = tokenize(
        ["--autoencoder", tiny_autoencoders["vq"], "--shards", str(src), "--out", str(tmp_path / "tok")]
    )
    assert done == {"with_tokens": 8, "without": 0, "shards": 1}
    # one more shard: a member of the wrong shape, a pickled object array, a float array, none at all
    bad = {"0100": _npy(np.zeros((3, 3), np.int16)), "0101": _npy(np.array([{"a": 1}], dtype=object)),
           "0102": _npy(np.zeros((4, 4), np.float32)), "0103": None}  # fmt: skip
    with tarfile.open(tmp_path / "tok" / "shard-00001.tar", "w") as tar:
        img = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        for key, tokens in bad.items():
            members = {"png": buf.getvalue(), "txt": b"a red square"}
            if tokens is not None:
                members["tokens.npy"] = tokens
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dm = TextImageDataModule(train_shards=str(tmp_path / "tok"), image_size=16, batch_size=4, num_workers=0,
                             tokens_shape=[4, 4], shuffle_buffer=1, train_batches_per_epoch=3)  # fmt: skip
    dm.setup("fit")
    seen = []
    stream = iter(dm.train_stream)
    for _ in range(8):
        seen.append(next(stream))
    assert all(s["tokens"].shape == (4, 4) and s["tokens"].dtype == torch.long for s in seen)
    prior = _ar(tiny_autoencoders["vq"]).eval()
    for s in seen:  # the script's tokens are the autoencoder's codes of the decoded image
        assert torch.equal(s["tokens"].flatten(), prior.tokens_of({"image": s["image"][None]})[0])
    batch = {"image": torch.zeros(1, 3, 16, 16), "tokens": seen[0]["tokens"][None]}
    assert torch.equal(prior.tokens_of(batch), seen[0]["tokens"].flatten()[None])  # batch tokens win
    counts = _skip_counts(dm.train_stream, tmp_path / "tok" / "shard-00001.tar")
    assert counts == {"bad_tokens": 3, "no_tokens": 1}


def _skip_counts(stream, url) -> dict:
    import random

    from datamodules.shards import SkipCounter

    skips = SkipCounter()
    list(stream._samples([str(url)], skips, random.Random(0)))
    return {k: v for k, v in skips.counts.items() if v}


def test_tokens_refuse_random_crops_and_flips():
    from datamodules.text_image import TextImageDataModule

    with pytest.raises(ValueError, match="centre crop"):
        TextImageDataModule(train_shards="x", tokens_shape=[4, 4], hflip=True)
