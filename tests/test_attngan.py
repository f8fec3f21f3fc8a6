"""AttnGAN: the DAMSM loss against a hand computation of the paper's equations, its masking of
shared captions, DAMSM pretraining that makes matching pairs score higher, and the attentional
generator trained against a frozen DAMSM (words steer the image, the DAMSM stays as it was, a
checkpoint round-trips); the two configs through the CLI."""

import math
import os

import pytest
import torch
from conftest import BLOCK_CAPTIONS, block_images, fit_and_save
from test_cli import ROOT, run_cli
from torch.utils.data import DataLoader

from lightning_modules.damsm import DAMSM, load_damsm
from lightning_modules.gan import AttnGAN
from networks.attngan import (
    AttnGenerator,
    DAMSMImageEncoder,
    WordAttention,
    damsm_loss,
    matching_loss,
    same_captions,
    sentence_scores,
    word_scores,
)
from networks.errors import ConfigError, MissingFileError
from networks.stackgan import MatchingAwareDiscriminator
from networks.text_encoders import TransformerTextEncoder

# ----------------------------------------------------------------------------- the loss by hand


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _pair_score(words, regions, g1, g2):
    """R(Q, D) of one caption (list of word vectors) and one image (list of region vectors), from
    the paper's equations 7 to 10, one number at a time."""
    s = [[_dot(e, v) for v in regions] for e in words]  # s[i][j] = e_i . v_j
    # eq. 8: normalised over the words, for every region j
    s_bar = [[0.0] * len(regions) for _ in words]
    for j in range(len(regions)):
        column = _softmax([s[i][j] for i in range(len(words))])
        for i in range(len(words)):
            s_bar[i][j] = column[i]
    relevances = []
    for i, e in enumerate(words):
        alpha = _softmax([g1 * s_bar[i][j] for j in range(len(regions))])  # eq. 9
        c = [sum(alpha[j] * regions[j][k] for j in range(len(regions))) for k in range(len(e))]
        relevances.append(_cos(c, e))  # R(c_i, e_i)
    return math.log(sum(math.exp(g2 * r) for r in relevances)) / g2  # eq. 10


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _bidirectional_ce(scores, g3, drop=frozenset()):
    """-log P(D_i|Q_i) - log P(Q_i|D_i), each averaged over the batch; ``scores[i][j]``: image i,
    caption j; pairs in ``drop`` are left out of the softmaxes."""
    n = len(scores)
    images_per_caption = sum(
        -math.log(_softmax([g3 * scores[i][j] for i in range(n) if i == j or (i, j) not in drop])[
            [i for i in range(n) if i == j or (i, j) not in drop].index(j)]) for j in range(n)) / n  # fmt: skip
    captions_per_image = sum(
        -math.log(_softmax([g3 * scores[i][j] for j in range(n) if i == j or (i, j) not in drop])[
            [j for j in range(n) if i == j or (i, j) not in drop].index(i)]) for i in range(n)) / n  # fmt: skip
    return images_per_caption + captions_per_image


def test_damsm_loss_equals_the_papers_equations_computed_by_hand():
    torch.manual_seed(0)
    b, t, n, d = 3, 4, 5, 6
    words, regions = torch.randn(b, t, d), torch.randn(b, n, d)
    sentence, global_image = torch.randn(b, d), torch.randn(b, d)
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True, True, False, False]])
    g1, g2, g3 = 4.0, 5.0, 10.0
    word, sent = damsm_loss(words, mask, sentence, regions, global_image, g1, g2, g3)
    lengths = mask.sum(1).tolist()
    scores = [[_pair_score(words[j, : lengths[j]].tolist(), regions[i].tolist(), g1, g2) for j in range(b)]
              for i in range(b)]  # fmt: skip
    assert torch.allclose(word_scores(words, mask, regions, g1, g2), torch.tensor(scores), atol=1e-5)
    assert word.item() == pytest.approx(_bidirectional_ce(scores, g3), rel=1e-5)
    cosines = [[_cos(global_image[i].tolist(), sentence[j].tolist()) for j in range(b)] for i in range(b)]
    assert sent.item() == pytest.approx(_bidirectional_ce(cosines, g3), rel=1e-5)
    # a padding word changes nothing: the same caption with its padding filled by noise
    noisy = words.clone()
    noisy[1, 3], noisy[2, 2:] = torch.randn(d) * 10, torch.randn(2, d) * 10
    assert torch.allclose(damsm_loss(noisy, mask, sentence, regions, global_image, g1, g2, g3)[0], word)


def test_masking_a_shared_caption_leaves_that_pair_out_of_the_negatives():
    torch.manual_seed(1)
    scores = torch.rand(4, 4)
    scores[0, 1] = scores[1, 0] = 0.99  # images 0 and 1 share a caption: each scores high on the other's
    same = same_captions(["a red square", "A red  square", "a blue circle", "a green star"])
    assert same.tolist() == [[True, True, False, False], [True, True, False, False],
                             [False, False, True, False], [False, False, False, True]]  # fmt: skip
    masked, plain = matching_loss(scores, 10.0, same), matching_loss(scores, 10.0)
    expected = _bidirectional_ce(scores.tolist(), 10.0, drop={(0, 1), (1, 0)})
    assert masked.item() == pytest.approx(expected, rel=1e-5)
    assert plain.item() == pytest.approx(_bidirectional_ce(scores.tolist(), 10.0), rel=1e-5)
    assert masked < plain  # the true caption of another image is no longer punished as a negative


def test_word_attention_is_each_positions_softmax_over_the_words():
    torch.manual_seed(2)
    attention = WordAttention(channels=3, word_dim=2)
    h, words = torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2)
    mask = torch.tensor([[True, True, True, False]])
    out = attention(h, words, mask)
    e = attention.project(words)[0]  # (4, 3)
    for y in range(2):
        for x in range(2):
            beta = torch.softmax(e[:3] @ h[0, :, y, x], dim=0)  # the padding word has no say
            assert torch.allclose(out[0, :, y, x], beta @ e[:3], atol=1e-6)


# ----------------------------------------------------------------------------- DAMSM pretraining


def _text(width=32):
    return TransformerTextEncoder(width=width, depth=1, heads=2, max_length=16, tokenizer="byte")


def _damsm():
    torch.manual_seed(0)
    return DAMSM(DAMSMImageEncoder(image_size=16, dim=16, channels=8), _text(),
                 optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))  # fmt: skip


def _blocks(steps):
    return DataLoader([{"image": block_images(), "caption": list(BLOCK_CAPTIONS)}] * steps, batch_size=None)


@pytest.fixture(scope="module")
def damsm_checkpoint(tmp_path_factory):
    return fit_and_save(_damsm(), _blocks(60), 60, str(tmp_path_factory.mktemp("damsm") / "damsm.ckpt"))


def test_damsm_pretraining_makes_matching_pairs_score_higher(damsm_checkpoint):
    before = _damsm().eval()
    after = load_damsm(damsm_checkpoint)
    images, captions = block_images(), list(BLOCK_CAPTIONS)

    def scores(model):
        with torch.no_grad():
            regions, global_image = model.image_encoder(images)
            text = model.text_encoder(captions)
            word = word_scores(text.tokens, text.mask, regions.flatten(2).transpose(1, 2), *model.gammas[:2])
            return word, sentence_scores(global_image, text.pooled), model.losses(images, captions)

    w0, s0, (lw0, ls0) = scores(before)
    w1, s1, (lw1, ls1) = scores(after)
    off = ~torch.eye(4, dtype=torch.bool)
    for s in (w1, s1):  # every image's own caption now beats every other caption, and the reverse
        assert (s.diag()[:, None] > s.masked_fill(~off, -9)).all() and (s.diag()[None] > s.masked_fill(~off, -9)).all()
    assert lw1 < lw0 / 2 and ls1 < ls0 / 2
    assert (s1.diag() - s1[off].view(4, 3).mean(1)).mean() > (s0.diag() - s0[off].view(4, 3).mean(1)).mean()
    # CLIP's two calls, for the paper's R-precision: unit vectors whose products are the sentence scores
    assert torch.allclose(after.encode_image(images) @ after.encode_text(captions).T, s1, atol=1e-5)


def test_load_damsm_names_a_missing_file_and_a_checkpoint_of_another_kind(tmp_path, tiny_methods):
    with pytest.raises(MissingFileError, match="pretrain one first"):
        load_damsm(str(tmp_path / "none.ckpt"))
    with pytest.raises(ConfigError, match="is not a DAMSM checkpoint"):
        load_damsm(tiny_methods["clip"])


# ----------------------------------------------------------------------------- the AttnGAN


def _attngan(damsm_checkpoint, **kw):
    torch.manual_seed(0)
    g = AttnGenerator(text_dim=16, image_size=16, num_stages=2, z_dim=8, cond_dim=8, channels=32, num_res_blocks=1)
    ds = [MatchingAwareDiscriminator(16, image_size=s, channels=8, cond_dim=8) for s in (8, 16)]
    return AttnGAN(damsm_checkpoint, g, ds, uncond_weight=1.0, **kw)


def test_the_words_steer_the_attention_stages(damsm_checkpoint):
    gan = _attngan(damsm_checkpoint).eval()
    with torch.no_grad():
        for p in gan.ema_generator.ca.parameters():  # the sentence vector's path closed: words alone
            p.zero_()
        a, b = (gan.generate([c], seed=[3], all_scales=True) for c in BLOCK_CAPTIONS[:2])
    assert torch.allclose(a[0], b[0], atol=1e-6)  # the stem sees the sentence alone: the same 8 px image
    assert (a[1] - b[1]).abs().max() > 1e-3  # the 16 px stage attends to the words
    batch = gan.generate(BLOCK_CAPTIONS, seed=[1, 2, 3, 4])
    assert torch.allclose(gan.generate(BLOCK_CAPTIONS[2:3], seed=[3])[0], batch[2], atol=1e-5)


def test_attngan_trains_with_the_damsm_loss_on_a_frozen_damsm_and_round_trips(damsm_checkpoint, tmp_path):
    gan = _attngan(damsm_checkpoint, damsm_weight=5.0)
    frozen = {k: v.clone() for k, v in gan.state_dict().items() if k.startswith(("text_encoder.", "damsm_image_encoder."))}
    captions = list(BLOCK_CAPTIONS)
    sentence = gan.sentence(captions)
    out = gan.run_generator(sentence, context=gan.encode(captions))
    total, logs = gan.g_loss(out, sentence.detach(), captions)
    gan.damsm_weight = 0.0
    plain, _ = gan.g_loss(out, sentence.detach(), captions)
    assert torch.isclose(total - plain, 5.0 * (logs["damsm_word"] + logs["damsm_sentence"]), rtol=1e-4)
    gan.damsm_weight = 5.0
    path = fit_and_save(gan, _blocks(3), 6, str(tmp_path / "attngan.ckpt"))
    assert all(torch.equal(gan.state_dict()[k], v) for k, v in frozen.items())  # DAMSM did not move
    assert gan.steps == {"g": 3, "d": 3} and not gan.text_encoder.training
    again = AttnGAN.load_from_checkpoint(path, weights_only=False)
    assert torch.equal(again.generate(captions, seed=5), gan.generate(captions, seed=5))


def test_attngan_needs_its_damsm(tmp_path):
    g = AttnGenerator(text_dim=16, image_size=16, num_stages=2, z_dim=8, cond_dim=8, channels=32)
    with pytest.raises(MissingFileError, match="model.init_args.damsm: DAMSM checkpoint"):
        AttnGAN(str(tmp_path / "missing.ckpt"), g, [MatchingAwareDiscriminator(16, image_size=16)])


def test_damsm_then_attngan_configs_run_through_the_cli(tmp_path):
    runs = tmp_path / "runs"
    data = ["--data.init_args.root", str(tmp_path / "shapes"), "--data.init_args.num_train", "40",
            "--data.init_args.num_val", "8", "--data.init_args.shard_size", "20", "--data.init_args.batch_size", "4",
            "--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(runs),
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    proc = run_cli(["fit", "--config", os.path.join(ROOT, "configs", "gan", "damsm_shapes32.yaml"), *data,
             "--trainer.max_steps", "2", "--trainer.val_check_interval", "null", "--run_name", "damsm",
             "--model.init_args.image_encoder.init_args.channels", "8"], tmp_path)  # fmt: skip
    last = runs / "damsm" / "checkpoints" / "last.ckpt"
    assert last.exists()
    assert "build on it: --model.init_args.damsm" in proc.stdout and "--model.init_args.clip" not in proc.stdout
    proc = run_cli(["fit", "--config", os.path.join(ROOT, "configs", "gan", "attngan_shapes32.yaml"), *data,
                    "--model.init_args.damsm", str(last), "--trainer.fast_dev_run", "1",
                    "--model.init_args.generator.init_args.channels", "32"], tmp_path)  # fmt: skip
    assert "max_steps=1` reached" in proc.stdout + proc.stderr
