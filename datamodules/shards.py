"""Reading and writing img2dataset-format tar shards, with every failure counted.

A shard is a tar file of samples; the members of one sample share a key (the basename up
to its first dot): ``{key}.jpg|jpeg|png|webp`` (the image), ``{key}.txt`` (one caption a
line, or a JSON list of captions) and an optional ``{key}.json`` (metadata). Only those
members are ever read; nothing is unpickled.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import braceexpand
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# The only decoders an image member may reach, whatever its bytes claim to be: no TIFF, BMP, GIF,
# PPM or EPS parser (PIL's EPS plugin would start Ghostscript) ever sees shard data.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
TEXT_EXTENSIONS = ("txt", "json")
TOKEN_EXTENSIONS = ("tokens.npy", "clip.npy")  # pre-computed image tokens and CLIP image embeddings (allow_pickle=False)
KNOWN_EXTENSIONS = IMAGE_EXTENSIONS + TEXT_EXTENSIONS + TOKEN_EXTENSIONS

# Reasons a sample (or a whole shard) is skipped; each is counted under ``data/skipped/<reason>``.
SKIP_REASONS = (
    "unreadable_shard",  # the tar could not be opened or broke off (truncated, missing, not a tar)
    "no_image",  # no member with an image extension
    "no_caption",  # no .txt member
    "empty_caption",  # .txt holds no non-blank caption
    "bad_text_encoding",  # .txt or .json is not UTF-8
    "bad_json",  # .json is not a JSON object
    "corrupt_image",  # the image does not decode (corrupt, truncated, not JPEG / PNG / WEBP)
    "too_large",  # more pixels than ``max_pixels`` or a member over ``max_member_bytes``
    "bad_mode",  # a colour mode that cannot be turned into RGB
    "no_tokens",  # tokens were asked for (tokens_shape) and the sample has no tokens.npy
    "bad_tokens",  # tokens.npy does not load without pickle, or has another shape or a non-integer dtype
    "no_clip_embed",  # CLIP embeddings were asked for (clip_embed_dim) and the sample has no clip.npy
    "bad_clip_embed",  # clip.npy does not load without pickle, or has another shape or a non-float dtype
)


@dataclass
class SkipCounter:
    """Counts of skipped samples by reason."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def expand_urls(spec: str | list[str]) -> list[str]:
    """Turn a shard specification into a list of URLs.

    Accepts a list, brace ranges (``data/{00000..00009}.tar``), several specs joined by
    ``::``, a directory (every ``*.tar`` in it), a glob, ``pipe:`` commands and http(s) URLs.
    """
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_urls(s)]
    urls: list[str] = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        if part.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
            urls.extend(braceexpand.braceexpand(part))
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            urls.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
        elif any(c in part for c in "*?["):
            urls.extend(sorted(glob.glob(part)))
        else:
            urls.extend(braceexpand.braceexpand(part))
    return urls


def _open_url(url: str):
    if url.startswith(("pipe:", "http://", "https://", "gs://", "s3://")):
        import webdataset as wds  # the stream opener for remote and piped shards

        return wds.gopen(url)
    return open(url, "rb")


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``), the webdataset convention."""
    dirname, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return os.path.join(dirname, stem), ext.lower()


def iter_tar_groups(
    url: str, skips: SkipCounter, max_member_bytes: int = 64 << 20
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each sample of one shard, reading only known members.

    A shard that cannot be opened or breaks off midway is counted once as
    ``unreadable_shard``; the samples read before the break are kept, the one in progress
    is dropped (it may be truncated).
    """
    key, members = None, {}
    try:
        with _open_url(url) as raw, tarfile.open(fileobj=(stream := _TailReader(raw)), mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if ext not in KNOWN_EXTENSIONS:
                    continue  # unknown members are never read, let alone unpickled
                if info.size > max_member_bytes:
                    members["__too_large__"] = b""
                    continue
                members[ext] = tar.extractfile(info).read()
            if not stream.ends_cleanly(tar.offset):
                raise tarfile.ReadError("no end-of-archive marker: the shard is truncated")
        if key is not None:
            yield key, members
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        skips.add("unreadable_shard")
        warnings.warn(
            f"shard {url!r} is unreadable or truncated ({err}); skipping the rest of it", stacklevel=2
        )


class _TailReader:
    """A read-only stream wrapper that remembers the last bytes read, to check the tar's end marker."""

    def __init__(self, raw, keep: int = 1 << 16):
        self.raw, self.keep, self.total, self.tail = raw, keep, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.keep :]
        return data

    def ends_cleanly(self, offset: int) -> bool:
        """Whether the archive's last member ends at ``offset`` followed by two zero blocks."""
        while self.read(1 << 16):  # drain what tarfile has not read (padding up to the record size)
            pass
        start = offset - (self.total - len(self.tail))
        marker = self.tail[start : start + 1024] if start >= 0 else b""
        return len(marker) == 1024 and not marker.strip(b"\0")


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_captions(raw: bytes) -> list[str]:
    """Captions from a ``.txt`` member: a JSON list of strings, or one caption a line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleError("bad_text_encoding") from err
    text = text.strip()
    captions: list[str] = []
    if text.startswith("["):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                captions = [str(c).strip() for c in parsed]
        except json.JSONDecodeError:
            captions = []
    if not captions:
        captions = [line.strip() for line in text.splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise SampleError("empty_caption")
    return captions


def parse_meta(raw: bytes | None) -> dict:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SampleError("bad_text_encoding") from err
    except json.JSONDecodeError as err:
        raise SampleError("bad_json") from err
    if not isinstance(meta, dict):
        raise SampleError("bad_json")
    return meta


def decode_image(raw: bytes, max_pixels: int, target_size: int | None = None) -> Image.Image:
    """Decode a JPEG, PNG or WEBP image to upright RGB, bounding its size and flattening alpha onto white.

    Only the decoders of ``IMAGE_FORMATS`` are tried; any other content is a ``corrupt_image``.
    The EXIF orientation is applied. Grayscale, palette, CMYK, 16-bit and alpha images are
    converted. Images with more than ``max_pixels`` pixels are refused before decoding their
    pixels (decompression bombs).
    """
    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        if img.width * img.height > max_pixels:
            raise SampleError("too_large")
        if target_size and img.format == "JPEG":
            img.draft("RGB", (target_size, target_size))  # decode large JPEGs at reduced scale
        img.load()
    except SampleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SampleError("corrupt_image") from err
    try:
        img = ImageOps.exif_transpose(img)  # a photo taken sideways comes out upright
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        pass  # unreadable EXIF: keep the pixels as stored
    try:
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
            img = background
        elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
            img = img.point(lambda v: v / 256).convert("L") if img.mode != "F" else img.convert("L")
        if img.mode != "RGB":
            img = img.convert("RGB")
    except (OSError, ValueError) as err:
        raise SampleError("bad_mode") from err
    return img


class ShardWriter:
    """Write samples into numbered tar shards: ``{prefix}-{index:05d}.tar``, ``max_count`` a shard."""

    def __init__(
        self, directory: str, prefix: str = "shard", max_count: int = 1000, max_bytes: int = 1 << 30
    ):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.prefix = directory, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.index, self.count, self.bytes, self.tar = -1, 0, 0, None
        self.paths: list[str] = []
        self.written = 0

    def _next(self) -> None:
        self.close()
        self.index += 1
        path = os.path.join(self.directory, f"{self.prefix}-{self.index:05d}.tar")
        self.tar = tarfile.open(path + ".partial", "w")
        self.paths.append(path)
        self.count, self.bytes = 0, 0

    def write(self, key: str, members: dict[str, bytes | str | dict]) -> None:
        if self.tar is None or self.count >= self.max_count or self.bytes >= self.max_bytes:
            self._next()
        for ext, value in members.items():
            if isinstance(value, dict):
                value = json.dumps(value)
            if isinstance(value, str):
                value = value.encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(value), 0, 0o644
            self.tar.addfile(info, io.BytesIO(value))
            self.bytes += len(value)
        self.count += 1
        self.written += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.paths[-1] + ".partial", self.paths[-1])  # a shard appears only when complete
            self.tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
