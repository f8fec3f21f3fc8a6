import csv
import json
import os

import pytest
from PIL import Image

from datamodules.convert import main
from datamodules.text_image import ShardStream, build_transform


def _images(folder, n):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24, 20), (40 * i, 100, 200)).save(
            os.path.join(folder, f"img{i}.{'png' if i % 2 else 'bmp'}")
        )


def _read(out_dir):
    stream = ShardStream([os.path.join(out_dir, f) for f in sorted(os.listdir(out_dir))], build_transform(16), "val",
                         val_samples=1000)  # fmt: skip
    seen, result = set(), []
    for s in stream:  # the val stream cycles; stop at the first repeat
        if s["key"] in seen:
            break
        seen.add(s["key"])
        result.append(s)
    return result


def test_folder_with_sidecar_captions(tmp_path):
    _images(tmp_path / "src", 5)
    for i in range(4):  # img4 has no caption
        (tmp_path / "src" / f"img{i}.txt").write_text(f"picture {i}\nanother caption")
    (tmp_path / "src" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "src" / "broken.txt").write_text("broken")
    summary = main(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "3"])
    assert summary["written"] == 4 and summary["skipped"] == {"no_caption": 1, "corrupt_image": 1}
    assert len(summary["shards"]) == 2
    samples = _read(tmp_path / "out")
    assert sorted(s["caption"] for s in samples) == [f"picture {i}" for i in range(4)]
    assert all(s["image"].shape == (3, 16, 16) for s in samples)


def test_csv_and_jsonl_tables(tmp_path):
    _images(tmp_path / "imgs", 3)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows([["img0.bmp", "zero"], ["img1.png", "one"], ["img1.png", "uno"], ["missing.png", "x"]])
    summary = main(
        ["table", str(tmp_path / "t.csv"), str(tmp_path / "o1"), "--image-root", str(tmp_path / "imgs")]
    )
    assert summary["written"] == 2 and summary["skipped"] == {"missing_image": 1}
    assert sorted(s["caption"] for s in _read(tmp_path / "o1")) == ["one", "zero"]
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"file": f"img{i}.{'png' if i % 2 else 'bmp'}", "text": f"c{i}"}) + "\n")
    summary = main(["table", str(tmp_path / "t.jsonl"), str(tmp_path / "o2"), "--image-root", str(tmp_path / "imgs"),
                    "--path-column", "file", "--caption-column", "text"])  # fmt: skip
    assert summary["written"] == 3
    assert sorted(s["caption"] for s in _read(tmp_path / "o2")) == ["c0", "c1", "c2"]


def test_coco_captions(tmp_path):
    _images(tmp_path / "val", 2)
    coco = {
        "images": [{"id": 7, "file_name": "img0.bmp"}, {"id": 9, "file_name": "img1.png"}, {"id": 3, "file_name": "x.png"}],
        "annotations": [{"image_id": 7, "caption": "a cat"}, {"image_id": 7, "caption": "a feline"},
                        {"image_id": 9, "caption": "a dog"}],
    }  # fmt: skip
    (tmp_path / "cap.json").write_text(json.dumps(coco))
    summary = main(
        ["coco", str(tmp_path / "cap.json"), str(tmp_path / "o"), "--image-root", str(tmp_path / "val")]
    )
    assert summary["written"] == 2 and summary["skipped"] == {"no_caption": 1}
    samples = {s["meta"]["coco_id"]: s for s in _read(tmp_path / "o")}
    assert samples[7]["caption"] == "a cat" and samples[9]["caption"] == "a dog"


def test_zero_samples_is_an_error_that_names_the_skipped_files_and_the_fix(tmp_path, capsys):
    _images(tmp_path / "imgs", 2)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], ["img0.bmp", "zero"], ["img1.png", "one"]])
    with pytest.raises(SystemExit) as exit_info:  # the paths are relative to imgs/, but no --image-root
        main(["table", str(tmp_path / "t.csv"), str(tmp_path / "out")])
    assert exit_info.value.code != 0 and "--image-root" in str(exit_info.value.code)
    printed = capsys.readouterr().out
    assert "skipped 2 (missing_image), e.g. img0.bmp, img1.png" in printed
    assert not os.listdir(tmp_path / "out")  # no empty shard left behind
