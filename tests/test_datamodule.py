import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import run_processes
from PIL import Image

from datamodules import ShapesDataModule, TextImageDataModule
from datamodules.shards import ShardWriter
from datamodules.text_image import SKIPS_KEY, ShardStream, build_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _good(i: int):
    return {"png": _encode(Image.new("RGB", (20, 12), (i * 20 % 255, 0, 0)), "PNG"), "txt": f"caption {i}"}


def _write_tar(path: str, samples: list[tuple[str, dict]]) -> None:
    """A shard of ``(key, {extension: bytes or str})`` samples, members written as given."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_bad_shard(path: str) -> dict[str, int]:
    """One sample of each bad kind between good ones; returns the expected skip counts."""
    rgb = Image.new("RGB", (16, 16), (10, 200, 30))
    jpeg = _encode(rgb, "JPEG")
    samples = [
        ("good0", _good(0)),
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": "x"}),
        ("truncated", {"jpg": jpeg[: len(jpeg) // 2], "txt": "x"}),
        ("nocaption", {"png": _encode(rgb, "PNG")}),
        ("emptycaption", {"png": _encode(rgb, "PNG"), "txt": "  \n \n"}),
        ("latin1", {"png": _encode(rgb, "PNG"), "txt": "caf\xe9".encode("latin-1")}),
        ("badjson", {"png": _encode(rgb, "PNG"), "txt": "ok", "json": b"{not json"}),
        ("noimage", {"pyd": b"\x80\x04pickled", "txt": "only a pickle"}),
        ("huge", {"png": _encode(Image.new("L", (3000, 3000)), "PNG"), "txt": "big"}),
        ("gray", {"png": _encode(rgb.convert("L"), "PNG"), "txt": "gray"}),
        ("rgba", {"png": _encode(rgb.convert("RGBA"), "PNG"), "txt": "rgba"}),
        ("cmyk", {"jpg": _encode(rgb.convert("CMYK"), "JPEG"), "txt": "cmyk"}),
        (
            "palette",
            {"png": _encode(rgb.convert("P"), "PNG"), "txt": json.dumps(["first", "second"]).encode()},
        ),
        (
            "extra",
            {"webp": _encode(rgb, "WEBP"), "txt": "with junk", "pkl": b"\x80\x04junk", "json": b'{"a": 1}'},
        ),
        ("good1", _good(1)),
    ]
    _write_tar(path, samples)
    return {"corrupt_image": 2, "no_caption": 1, "empty_caption": 1, "bad_text_encoding": 1, "bad_json": 1,
            "no_image": 1, "too_large": 1}  # fmt: skip


def _val_stream(urls, **kw):
    return ShardStream(urls, build_transform(16), "val", **kw)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    path = str(tmp_path / "bad.tar")
    expected = _write_bad_shard(path)
    # a truncated tar: the first half of a good shard
    with ShardWriter(str(tmp_path / "t"), max_count=10) as w:
        for i in range(6):
            w.write(f"s{i}", _good(i))
    data = open(w.paths[0], "rb").read()
    trunc = str(tmp_path / "truncated.tar")
    open(trunc, "wb").write(data[: len(data) // 2 + 100])
    stream = _val_stream([path, trunc, str(tmp_path / "missing.tar")], val_samples=1000, max_pixels=4_000_000)
    it = iter(stream)
    samples = [next(it) for _ in range(20)]
    keys = [s["key"] for s in samples[:8]]
    assert keys == ["good0", "gray", "rgba", "cmyk", "palette", "extra", "good1", "s0"]
    assert all(
        s["image"].shape == (3, 16, 16) and s["image"].min() >= -1 and s["image"].max() <= 1 for s in samples
    )
    assert samples[4]["caption"] == "first"  # JSON list of captions, first in validation
    assert samples[5]["meta"] == {"a": 1}
    counts = samples[-1][SKIPS_KEY][1]
    for reason, n in expected.items():
        assert counts[reason] >= n, reason
    assert counts["unreadable_shard"] >= 2  # the truncated and the missing shard
    assert counts["corrupt_image"] % expected["corrupt_image"] == 0


def test_batch_contract_and_skips_reported_by_datamodule(tmp_path, shapes16):
    _write_bad_shard(str(tmp_path / "bad.tar"))
    dm = TextImageDataModule(
        train_shards=[os.path.join(shapes16, "train"), str(tmp_path / "bad.tar")],
        val_shards=os.path.join(shapes16, "val"),
        image_size=16, batch_size=8, num_workers=0, train_batches_per_epoch=3, val_samples=20,
        max_pixels=4_000_000, shuffle_buffer=4,
    )  # fmt: skip
    dm.setup("fit")
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert len(batches) == 3
    b = batches[0]
    assert set(b) == {"image", "caption", "key", "meta"}
    assert b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == torch.float32
    assert -1 <= b["image"].min() and b["image"].max() <= 1 and b["image"].min() < -0.5
    assert len(b["caption"]) == len(b["key"]) == len(b["meta"]) == 8 and all(
        isinstance(c, str) for c in b["caption"]
    )
    val = [dm.on_before_batch_transfer(b, 0) for b in dm.val_dataloader()]
    assert sum(len(v["key"]) for v in val) == 20
    # run the stream until the bad shard has been read; its skips must reach the datamodule
    for _ in range(40):
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)
        if dm.skipped("train").get("no_image"):
            break
    assert dm.skipped("train")["corrupt_image"] >= 2


def test_ranks_read_disjoint_shards_and_equal_validation(shapes16):
    dm = ShapesDataModule(
        root=shapes16, resolution=16, num_train=600, num_val=64, shard_size=100, num_workers=0
    )
    train_urls = dm._urls(dm.train_shards, "train_shards")
    keys = {}
    for rank in range(2):
        stream = ShardStream(
            train_urls, build_transform(16), "train", rank=rank, world_size=2, shuffle_buffer=2
        )
        it = iter(stream)
        keys[rank] = {next(it)["key"] for _ in range(250)}
    assert not keys[0] & keys[1]
    val_urls = dm._urls(dm.val_shards, "val_shards")
    per_rank = [
        [s["key"] for s in _val_stream(val_urls, rank=r, world_size=3, val_samples=60)] for r in range(3)
    ]
    assert [len(p) for p in per_rank] == [20, 20, 20]
    assert not set(per_rank[0]) & set(per_rank[1])
    again = [s["key"] for s in _val_stream(val_urls, rank=0, world_size=3, val_samples=60)]
    assert again == per_rank[0]  # the validation set is deterministic


def test_training_stream_is_deterministic_under_a_seed(shapes16):
    urls = [os.path.join(shapes16, "train", f"shapes-{i:05d}.tar") for i in range(6)]
    runs = []
    for _ in range(2):
        it = iter(ShardStream(urls, build_transform(16), "train", seed=5, shuffle_buffer=16))
        runs.append([(s["key"], s["caption"]) for s in (next(it) for _ in range(30))])
    assert runs[0] == runs[1]
    other = iter(ShardStream(urls, build_transform(16), "train", seed=6, shuffle_buffer=16))
    assert [next(other)["key"] for _ in range(30)] != [k for k, _ in runs[0]]


def test_missing_shards_fail_with_a_clear_error(tmp_path):
    dm = TextImageDataModule(train_shards=str(tmp_path / "nothing-{000..003}.tar"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="train_shards"):
        dm.setup("fit")


@pytest.mark.slow  # two gloo processes; test_ranks_read_disjoint_shards_and_equal_validation is the same rule in one
def test_ddp_two_ranks_read_disjoint_shards_with_equal_batches(shapes16, tmp_path):
    out = tmp_path / "ddp.json"
    proc = run_processes(
        [sys.executable, os.path.join(ROOT, "tests", "ddp_data_script.py"), shapes16, str(out)],
        timeout=150, retries=1, cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {int(k): v for k, v in json.loads(out.read_text()).items()}
    assert set(result) == {0, 1}
    assert result[0]["train_batches"] == result[1]["train_batches"] == 2 * 4
    assert result[0]["val_batches"] == result[1]["val_batches"]
    assert not set(result[0]["shards"]) & set(result[1]["shards"])
    assert np.isfinite(result[0]["loss"])


def test_only_jpeg_png_and_webp_are_decoded_whatever_the_extension_says(tmp_path):
    """EPS, TIFF and BMP bytes in a .jpg member never reach their decoders (PIL's EPS plugin would
    start Ghostscript): they are skipped and counted as corrupt images."""
    from PIL import Image

    rgb = Image.new("RGB", (16, 16), (200, 30, 30))
    eps = io.BytesIO()
    rgb.save(eps, format="EPS")  # writing EPS needs no Ghostscript
    path = str(tmp_path / "disguised.tar")
    samples = [("eps", {"jpg": eps.getvalue(), "txt": "x"}), ("tiff", {"jpg": _encode(rgb, "TIFF"), "txt": "x"}),
               ("bmp", {"jpeg": _encode(rgb, "BMP"), "txt": "x"}), ("gif", {"png": _encode(rgb, "GIF"), "txt": "x"}),
               ("pngasjpg", {"jpg": _encode(rgb, "PNG"), "txt": "a png named .jpg is still a png"})]  # fmt: skip
    _write_tar(path, samples)
    it = iter(_val_stream([path], val_samples=2))
    first = next(it)
    assert first["key"] == "pngasjpg"
    assert first[SKIPS_KEY][1] == {"corrupt_image": 4}


def test_exif_orientation_is_applied():
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view) comes out upright."""
    from PIL import Image

    from datamodules.shards import decode_image

    upright = Image.new("RGB", (12, 24), (220, 30, 30))  # 12 wide, 24 high: red top half, blue bottom half
    upright.paste((30, 30, 220), (0, 12, 12, 24))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), max_pixels=10_000)
    assert out.size == (12, 24)
    top, bottom = out.getpixel((6, 3)), out.getpixel((6, 20))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def _wide_shard(path, n=6):
    """Samples 32 wide and 16 high with a colour ramp, so that crops and flips are visible."""
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (16, 1, 3))
    with ShardWriter(os.path.dirname(path), prefix=os.path.basename(path), max_count=100) as w:
        for i in range(n):
            w.write(
                f"s{i}",
                {
                    "png": _encode(Image.fromarray(ramp), "PNG"),
                    "txt": json.dumps([f"first {i}", f"second {i}"]),
                },
            )
    return w.paths


def test_crops_flips_and_captions_differ_across_ranks_and_workers_and_repeat_under_a_seed(tmp_path):
    urls = _wide_shard(str(tmp_path / "wide"))

    def draws(rank, world, seed, worker=None):
        stream = ShardStream(urls, build_transform(16, "random", hflip=True), "train", rank=rank, world_size=world,
                             seed=seed, shuffle_buffer=1)  # fmt: skip
        if worker is not None:
            stream._worker = lambda: worker
        it = iter(stream)
        out = [next(it) for _ in range(24)]
        return [
            (s["key"], s["caption"], s["image"][0, 0, 0].item(), s["image"][0, 0, -1].item()) for s in out
        ]

    rank0, rank1 = draws(0, 2, seed=3), draws(1, 2, seed=3)
    assert rank0 == draws(0, 2, seed=3)  # the same seed repeats
    assert rank0 != rank1 and rank0 != draws(0, 2, seed=4)
    # the same sample gets other crops and flips on another rank (one shard: both ranks read all of it)
    pixels = {r: {(k, c, a, b) for k, c, a, b in d} for r, d in ((0, rank0), (1, rank1))}
    assert pixels[0] != pixels[1]
    assert len({(a, b) for _, _, a, b in rank0}) > 3  # crops vary: several left/right edge values
    assert any(a > b for _, _, a, b in rank0) and any(a < b for _, _, a, b in rank0)  # flipped and not
    assert len({c.split()[0] for _, c, _, _ in rank0}) == 2  # both captions get chosen
    assert draws(0, 1, seed=3, worker=(0, 2)) != draws(0, 1, seed=3, worker=(1, 2))  # workers differ too


def test_training_skip_counts_continue_across_a_resume(tmp_path, shapes16):
    """The skip counts are saved in the checkpoint and restored, so data/skipped keeps counting."""
    import lightning as L
    from tiny_module import TinyRegression

    from networks.text_encoders import TransformerTextEncoder

    _write_bad_shard(str(tmp_path / "bad.tar"))

    def datamodule():
        return TextImageDataModule(train_shards=[str(tmp_path / "bad.tar")], image_size=16, batch_size=4,
                                   num_workers=0, train_batches_per_epoch=3, max_pixels=4_000_000, shuffle_buffer=2)  # fmt: skip

    def fit(steps, dm, ckpt=None):
        model = TinyRegression(TransformerTextEncoder(width=16, depth=1, heads=2, tokenizer="byte"))
        trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path), accelerator="cpu", enable_checkpointing=False)  # fmt: skip
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt, weights_only=False)
        return trainer

    dm = datamodule()
    trainer = fit(3, dm)
    before = dm.skipped("train")
    assert before["corrupt_image"] >= 2
    trainer.save_checkpoint(str(tmp_path / "a.ckpt"))
    resumed = datamodule()
    fit(6, resumed, str(tmp_path / "a.ckpt"))
    after = resumed.skipped("train")
    assert all(after[k] > v for k, v in before.items())  # the resumed run adds to the saved counts


@pytest.mark.parametrize("num_shards", [1000, 100, 4096, 5000])
def test_shard_assignment_at_64_nodes_x_8_gpus_x_8_workers_reads_every_sample_once_per_pass(num_shards):
    """A simulation of the training stream's split over 4,096 slots: each sample is kept by
    exactly one slot, and the slots' shares differ by at most one shard's worth."""
    from datamodules.text_image import shard_assignment

    slots, per_shard = 64 * 8 * 8, 40
    reads = np.zeros((num_shards, per_shard), dtype=np.int64)
    shares = []
    for slot in range(slots):
        shards, stride, offset = shard_assignment(num_shards, slot, slots)
        assert shards, slot  # no slot without data
        kept = 0
        for index in range(len(shards) * per_shard):  # the running index over its shards
            if index % stride == offset:
                reads[shards[index // per_shard], index % per_shard] += 1
                kept += 1
        shares.append(kept)
    assert (reads == 1).all()
    assert max(shares) - min(shares) <= per_shard
