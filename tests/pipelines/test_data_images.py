"""One image preprocessing: MingTok's training, evaluation and reconstruction
(`tokenizer.data.decode_image`) see every image exactly as the data stage encodes it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from uniloom.pipelines.data.images import Load, Open, ResizeCrop, square_pixels
from uniloom.pipelines.data.schema import SOURCE_SCHEMA
from uniloom.pipelines.data.stages import OK, Batch
from uniloom.pipelines.tokenizer.data import decode_image

S = 32


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_stage_pixels(images: list[bytes]) -> np.ndarray:
    """The data stage's image path (open, decode + orientation + RGB, crop + resize)."""
    base = {"shard": "s", "caption": "c", "meta": None, "status": OK, "reason": None, "shard_rows": None}
    rows = [{**base, "key": f"k{i}", "image": data} for i, data in enumerate(images)]
    batch = Batch(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA))
    for stage in (Open(max_pixels=10**8), Load(), ResizeCrop(S)):
        stage.process(batch, batch.live())
    assert (batch.status == OK).all(), batch.reason
    return batch.values["pixels"]  # (B, S, S, 3)


def photo(width: int, height: int) -> Image.Image:
    """Noise over a gradient: every resampling difference shows."""
    rng = np.random.default_rng(width * height)
    ramp = np.linspace(0, 200, width)[None, :, None] + rng.integers(0, 55, (height, width, 3))
    return Image.fromarray(ramp.astype(np.uint8))


def translucent(width: int, height: int) -> Image.Image:
    img = photo(width, height).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize((width, height)))  # transparent at the top
    return img


def rotated_jpeg(width: int, height: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    return encode(photo(width, height), "JPEG", quality=90, exif=exif)


@pytest.mark.parametrize(
    "image",
    [
        encode(photo(90, 60)),  # landscape
        encode(photo(41, 100)),  # portrait, odd sizes
        encode(photo(S, S)),  # already the model's size
        encode(translucent(70, 50)),
        rotated_jpeg(80, 48),
    ],
    ids=["landscape", "portrait", "exact", "rgba", "jpeg-exif"],
)
def test_the_tokenizer_and_the_data_stage_give_the_same_pixels(image):
    tokenizer = decode_image(image, S, "x")  # (3, S, S)
    assert tokenizer.shape == (3, S, S) and tokenizer.dtype == np.uint8
    np.testing.assert_array_equal(tokenizer.transpose(1, 2, 0), data_stage_pixels([image])[0])


def test_a_non_square_image_is_centre_cropped_not_stretched():
    img = Image.new("RGB", (120, 40), (0, 0, 255))
    img.paste(Image.new("RGB", (40, 40), (255, 0, 0)), (40, 0))  # the centre square is red
    pixels = decode_image(encode(img), S, "wide.png").astype(int)  # (3, S, S)
    assert (pixels[0] > 200).all() and (pixels[2] < 60).all()  # stretching would bring blue in
    exact = photo(S, S)
    assert np.array_equal(square_pixels(exact, S), np.asarray(exact))  # the right size is untouched
