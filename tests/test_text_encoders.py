import pytest
import torch

from networks.text_encoders import PretrainedTextEncoder, TransformerTextEncoder


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_trainable_encoder_interface(tokenizer):
    enc = TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer=tokenizer)
    out = enc(["a red circle", "two blue squares to the left of a very long caption that is cut"])
    assert out.tokens.shape == (2, 16, 32) and out.pooled.shape == (2, 32)
    assert out.mask.dtype == torch.bool and out.mask[0].sum() < out.mask[1].sum() == 16
    assert not torch.allclose(out.pooled[0], out.pooled[1])
    # padding does not leak: the same caption gives the same encoding in any batch
    alone = enc(["a red circle"])
    assert torch.allclose(alone.pooled[0], out.pooled[0], atol=1e-5)


def test_pretrained_encoder_from_local_directory(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(cfg).save_pretrained(tmp_path)
    enc = PretrainedTextEncoder(str(tmp_path), max_length=8)
    out = enc(["a red circle", "a blue square"])
    assert out.tokens.shape == (2, 8, 16) and enc.dim == 16 and out.mask[0].sum() == 5  # cls a red circle sep
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training
    assert not torch.allclose(out.pooled[0], out.pooled[1])


def test_missing_pretrained_path_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder.init_args.path"):
        PretrainedTextEncoder(str(tmp_path / "nope"))


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_russian_captions_tokenise_without_loss_and_a_loss_is_named(tokenizer):
    import warnings

    from datamodules import openmoji as O
    from networks.text_encoders import BPETokenizer, ByteTokenizer, roundtrip_problems

    tok = BPETokenizer() if tokenizer == "bpe" else ByteTokenizer()
    russian = [c for d in O.catalogue() for c in O.captions(d)[len(O.TEMPLATES["en"]):]]
    assert len(russian) > 9000 and any("тон кожи" in c for c in russian)
    # the OpenMoji configs' 96 tokens keep every Russian caption whole with open_clip's BPE
    length = 96 if tokenizer == "bpe" else 400
    assert roundtrip_problems(tok, russian, length, tokenizer) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning; the problem names it too
        short = roundtrip_problems(tok, ["эмодзи: машет рукой: темный тон кожи"], 12, tokenizer)
    assert len(short) == 1 and tokenizer in short[0] and "машет рукой" in short[0] and "raise max_length" in short[0]

    class Lossy:  # a tokenizer without Cyrillic: every letter becomes one unknown token
        def __call__(self, texts, max_length):
            import torch

            return torch.tensor([[ord(ch) if ord(ch) < 128 else ord("?") for ch in t[:max_length]] for t in texts])

        def decode(self, ids):
            return "".join(chr(int(i)) for i in ids)

    (problem,) = roundtrip_problems(Lossy(), ["эмодзи: яблоко"], 64, "ascii")
    assert "the ascii tokenizer does not keep 'эмодзи: яблоко'" in problem
