"""Image stages: open (header only), load (decode, EXIF orientation, RGB), centre crop to
the model's resolution, perceptual hash, and the target images of edit chains."""

from __future__ import annotations

import hashlib
import io
import json
import warnings

import numpy as np
from PIL import Image, ImageOps

from uniloom.pipelines.data.stages import QUARANTINED, Batch, Quarantine, RowStage, Stage

PHASH_SIDE = 32  # pHash: DCT of a 32x32 grey image, its 8x8 lowest frequencies


class ParseMeta(RowStage):
    """The sample's JSON (ground truth, VQA pairs), parsed once for later stages."""

    name = "parse_meta"
    outputs = ("meta_obj",)

    def row(self, batch: Batch, i: int) -> tuple:
        text = batch.column("meta")[i]
        if text is None:
            return (None,)
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise Quarantine(f"meta is not valid JSON ({e})") from None
        return (obj if isinstance(obj, dict) else None,)


class Open(RowStage):
    """Reads only the header: format and size, so oversized images and the size filters
    cost no decoding."""

    name = "open"
    outputs = ("pil", "width", "height")

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    def row(self, batch: Batch, i: int) -> tuple:
        img = open_image(batch.column("image")[i], self.max_pixels)
        return img, *img.size


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, checked; raises Quarantine saying what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own cap, 2 x Image.MAX_IMAGE_PIXELS
        raise Quarantine(f"decompression bomb: {e}") from None
    except Exception as e:  # untrusted bytes: any failure is this row's, never the run's
        raise Quarantine(f"not a readable image ({e.__class__.__name__})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Quarantine(f"{w}x{h} pixels exceed max_pixels {max_pixels}")
    if w < 1 or h < 1:
        raise Quarantine(f"empty image ({w}x{h})")
    if img.mode == "F":  # a float TIFF: 0-1, 0-255 or physical units, the file does not say
        raise Quarantine("floating-point pixels (mode F) have no known 8-bit scale")
    return img


def load_image(img: Image.Image) -> Image.Image:
    """Decoded pixels, upright (EXIF orientation), RGB; raises Quarantine."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            return _rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # truncated data, bad EXIF, odd modes: this row only
        raise Quarantine(f"image does not decode ({e.__class__.__name__}: {e})") from None


def _rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels over white rather than black; 16-bit greys (PIL's I;16 of
    PNG and TIFF, and I of 16-bit PGM) scaled to 8 bits, where PIL's convert would clip
    every value over 255 to white."""
    if img.mode.startswith("I"):
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


class Load(RowStage):
    """Decodes the pixels, applies the EXIF orientation, converts to RGB, and hashes the
    pixels (exact dedup sees the same picture stored as PNG or as another file)."""

    name = "load"
    outputs = ("rgb", "sha", "width", "height")

    def row(self, batch: Batch, i: int) -> tuple:
        img = load_image(batch.values["pil"][i])
        batch.values["pil"][i] = None
        digest = hashlib.blake2b(img.tobytes(), digest_size=16)
        digest.update(f"{img.width}x{img.height}".encode())
        return img, digest.digest(), img.width, img.height


def square_pixels(img: Image.Image, size: int) -> np.ndarray:
    """The one preprocessing of every image MingTok sees (its training, evaluation and
    reconstruction, and the data stage): RGB, centre crop to a square, bicubic resize to
    `size`. (size, size, 3) uint8. Cropping, not stretching: shapes keep their proportions."""
    img = _rgb(img)
    if img.size == (size, size):
        return np.asarray(img)
    side = min(img.width, img.height)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    box = (left, top, left + side, top + side)
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0))


class ResizeCrop(Stage):
    """Centre crop to a square and resize (`square_pixels`): (B, size, size, 3) uint8."""

    name = "resize_crop"

    def __init__(self, size: int):
        self.size = size

    def process(self, batch: Batch, idx: np.ndarray) -> None:
        S = self.size
        pixels = np.zeros((batch.n, S, S, 3), dtype=np.uint8)
        for i in idx.tolist():
            pixels[i] = square_pixels(batch.values["rgb"][i], S)
            batch.values["rgb"][i] = None
        batch.values["pixels"] = pixels


def phash(pixels: np.ndarray) -> np.ndarray:
    """64-bit perceptual hashes of (B, S, S, 3) uint8 images, as uint64 (B,)."""
    from scipy.fft import dctn

    B, S = pixels.shape[0], pixels.shape[1]
    grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (B, S, S)
    if S % PHASH_SIDE == 0:
        k = S // PHASH_SIDE
        small = grey.reshape(B, PHASH_SIDE, k, PHASH_SIDE, k).mean(axis=(2, 4))
    else:
        small = np.stack(
            [
                np.asarray(Image.fromarray(g).resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.BOX))
                for g in grey
            ]
        )
    low = dctn(small, axes=(1, 2), norm="ortho")[:, :8, :8].reshape(B, 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").reshape(B).astype(np.uint64)


class PerceptualHash(Stage):
    name = "phash"

    def process(self, batch: Batch, idx: np.ndarray) -> None:
        hashes = np.zeros(batch.n, dtype=np.uint64)
        hashes[idx] = phash(batch.values["pixels"][idx])
        batch.values["phash"] = hashes


class EditTargets(Stage):
    """Rows with an edit chain: every round's target image decoded, checked like the source
    and cropped to the model's resolution as the source is, so the editing task has a
    target for each round. A target that does not decode quarantines the row with its
    round: a chain is trained whole."""

    name = "edit_targets"

    def __init__(self, size: int, max_pixels: int):
        self.size, self.max_pixels = size, max_pixels

    def process(self, batch: Batch, idx: np.ndarray) -> None:
        targets: list[np.ndarray | None] = [None] * batch.n  # (R, S, S, 3) uint8 per row
        chains = batch.column("edit_images")
        for i in idx.tolist():
            if not chains[i]:
                continue
            try:
                targets[i] = np.stack([self.target(r, data) for r, data in enumerate(chains[i])])
            except Quarantine as e:
                batch.reject(i, QUARANTINED, str(e))
        batch.values["edit_pixels"] = targets

    def target(self, r: int, data: bytes) -> np.ndarray:
        try:
            return square_pixels(load_image(open_image(data, self.max_pixels)), self.size)
        except Quarantine as e:
            raise Quarantine(f"edit round {r} target: {e}") from None
