"""Convert a folder of images with sidecar captions, a CSV/JSONL of (path, caption) or a
COCO-captions JSON into img2dataset-format tar shards.

    python scripts/make_shards.py folder  photos/            out/ --shard-size 1000
    python scripts/make_shards.py table   captions.csv       out/ --image-root photos/
    python scripts/make_shards.py coco    captions_val.json  out/ --image-root val2017/
    python scripts/make_shards.py openmoji out/ --resolution 64   # from installed packages (datamodules/openmoji.py)

Images are checked (decoded once) and re-encoded only when their format is not one of the
shard formats; unusable inputs are skipped and summarised by reason at the end.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence

from PIL import Image

from .shards import ShardWriter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # the decoders inputs may reach (no EPS)
EXAMPLES = 3  # skipped files named per reason in the summary


def from_folder(root: str) -> Iterator[tuple[str, list[str] | None, dict]]:
    """Images under ``root`` with a ``.txt`` of the same stem beside them."""
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            txt = os.path.join(dirpath, stem + ".txt")
            captions = None
            if os.path.exists(txt):
                with open(txt, encoding="utf-8", errors="strict") as f:
                    captions = [line.strip() for line in f if line.strip()]
            yield (
                os.path.join(dirpath, name),
                captions,
                {"source": os.path.relpath(os.path.join(dirpath, name), root)},
            )


def from_table(path: str, image_root: str = "", path_column: str = "path", caption_column: str = "caption"):
    """Rows of a CSV (with a header) or JSONL file; several rows of one image are merged."""
    rows: dict[str, list[str]] = defaultdict(list)
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f))
    for rec in records:
        if path_column not in rec:
            raise KeyError(f"{path}: no column {path_column!r} (columns: {sorted(rec)}); use --path-column")
        caption = rec.get(caption_column)
        rows[str(rec[path_column])].append(str(caption).strip() if caption is not None else "")
    for rel, captions in rows.items():
        yield os.path.join(image_root, rel), [c for c in captions if c] or None, {"source": rel}


def from_coco(path: str, image_root: str = ""):
    """A COCO captions file: ``images`` (id, file_name) and ``annotations`` (image_id, caption)."""
    with open(path, encoding="utf-8") as f:
        coco = json.load(f)
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in coco.get("annotations", []):
        captions[ann["image_id"]].append(ann["caption"].strip())
    for img in coco.get("images", []):
        yield (
            os.path.join(image_root, img["file_name"]),
            captions.get(img["id"]) or None,
            {
                "source": img["file_name"],
                "coco_id": img["id"],
                "width": img.get("width"),
                "height": img.get("height"),
            },
        )


def convert(
    items: Iterator[tuple[str, list[str] | None, dict]],
    out_dir: str,
    shard_size: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
) -> dict:
    """Write ``items`` as shards into ``out_dir``; returns ``{"written", "skipped": {reason: n},
    "examples": {reason: [the first few skipped paths]}, "shards"}``."""
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)

    def skip(reason: str, path: str) -> None:
        skipped[reason] += 1
        if len(examples[reason]) < EXAMPLES:
            examples[reason].append(path)

    if progress:
        from tqdm import tqdm

        items = tqdm(items, unit="img", desc="shards")
    with ShardWriter(out_dir, prefix=prefix, max_count=shard_size) as writer:
        for path, captions, meta in items:
            if not captions:
                skip("no_caption", path)
                continue
            if not os.path.exists(path):
                skip("missing_image", path)
                continue
            try:
                with Image.open(path, formats=INPUT_FORMATS) as img:
                    img.load()
                    fmt = (img.format or "").lower()
                    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt)
                    if ext is None:  # re-encode formats that shards do not carry
                        buf = io.BytesIO()
                        img.convert("RGB").save(buf, format="PNG")
                        data, ext = buf.getvalue(), "png"
                    else:
                        with open(path, "rb") as f:
                            data = f.read()
            except (OSError, ValueError, Image.DecompressionBombError):
                skip("corrupt_image", path)
                continue
            writer.write(f"{writer.written:09d}", {ext: data, "txt": "\n".join(captions), "json": meta})
    return {
        "written": writer.written,
        "skipped": dict(skipped),
        "examples": dict(examples),
        "shards": writer.paths,
    }


FIXES = {
    "missing_image": "image paths are read relative to --image-root ({image_root!r}); point it at the folder the paths start from",
    "no_caption": "every image needs a caption: a .txt of the same name beside it (folder), or a non-empty --caption-column (table)",
    "corrupt_image": "the files are not images that decode (JPEG, PNG, WEBP, BMP, GIF or TIFF)",
}


def main(argv: Sequence[str] | None = None) -> dict | None:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["openmoji"]:  # a dataset built from installed packages: no source to read
        from .openmoji import main as openmoji_main

        return openmoji_main(args[1:])
    p = argparse.ArgumentParser(description="Convert images and captions into img2dataset-format tar shards.")
    p.add_argument("kind", choices=["folder", "table", "coco"], help="input kind (or openmoji OUT: see datamodules/openmoji.py)")
    p.add_argument("source", help="folder of images + .txt, CSV/JSONL file, or COCO captions JSON")
    p.add_argument("out_dir", help="folder for the shards")
    p.add_argument(
        "--image-root", default="", help="folder the table's or COCO file's image paths are relative to"
    )
    p.add_argument("--path-column", default="path")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="shard")
    a = p.parse_args(args)
    if a.kind == "folder":
        items = from_folder(a.source)
    elif a.kind == "table":
        items = from_table(a.source, a.image_root, a.path_column, a.caption_column)
    else:
        items = from_coco(a.source, a.image_root)
    summary = convert(items, a.out_dir, a.shard_size, a.prefix)
    print(f"wrote {summary['written']} samples into {len(summary['shards'])} shard(s) in {a.out_dir}")
    for reason, n in sorted(summary["skipped"].items()):
        named = ", ".join(summary["examples"].get(reason, []))
        print(f"skipped {n} ({reason}), e.g. {named}")
    if summary["written"] == 0:
        reason = max(summary["skipped"], key=summary["skipped"].get) if summary["skipped"] else None
        fix = FIXES.get(reason, "check the source path").format(image_root=a.image_root)
        raise SystemExit(f"error: no sample was written from {a.source}: {fix}")
    if summary["shards"]:
        print(f"train on them with: --data.init_args.train_shards {a.out_dir}")
    return summary


if __name__ == "__main__":
    main()
