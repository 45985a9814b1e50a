"""The CPU stages on crafted rows: decoding and validation, filters, crop, hashes, edit
targets (decoded from the row's target images) and text ids, as the Prepare function composes them."""

import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from uniloom.pipelines.data import text_tokenizer
from uniloom.pipelines.data.config import DataConfig, FilterConfig
from uniloom.pipelines.data.dedup import hamming
from uniloom.pipelines.data.images import phash, square_pixels
from uniloom.pipelines.data.prepare import Prepare
from uniloom.pipelines.data.schema import SOURCE_SCHEMA
from uniloom.pipelines.data.stages import END, FILTERED, OK, QUARANTINED, Batch, Filter

S = 32


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def halves(size=(60, 40), a=(255, 0, 0), b=(0, 0, 255)) -> Image.Image:
    """Left half `a`, right half `b`."""
    img = Image.new("RGB", size, a)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), b), (size[0] // 2, 0))
    return img


@pytest.fixture(scope="module")
def tok_ref(tmp_path_factory):
    texts = ["a red circle", "two blue squares", "What colour is the circle?", "red"] * 5
    tok = text_tokenizer.train_bpe(texts, 300, 1)
    return text_tokenizer.save_beside(tok, str(tmp_path_factory.mktemp("tok")), {})


def source(rows: list[dict]) -> pa.Table:
    base = {"shard": "s", "key": None, "image": None, "caption": "a red circle", "meta": None,
            "status": OK, "reason": None, "shard_rows": None}  # fmt: skip
    filled = [{**base, "key": f"k{i}", **r} for i, r in enumerate(rows)]
    return pa.Table.from_pylist(filled, schema=SOURCE_SCHEMA)


def prepare(rows, tok_ref, **cfg) -> list[dict]:
    filters = FilterConfig(**cfg.pop("filters", {}))
    return Prepare(DataConfig(filters=filters, **cfg), S, tok_ref)(source(rows)).to_pylist()


def test_unreadable_oversized_and_truncated_images_are_quarantined_with_reasons(tok_ref):
    png = encode(halves())
    out = prepare(
        [{"image": b"not an image"}, {"image": png[: len(png) // 2]}, {"image": png}],
        tok_ref,
        max_pixels=10_000,
    )
    assert [r["status"] for r in out] == [QUARANTINED, QUARANTINED, OK]
    assert out[0]["reason"] == "not a readable image (UnidentifiedImageError)"
    assert out[1]["reason"].startswith("image does not decode")
    assert out[2]["pixels"] is not None and out[0]["pixels"] is None
    big = prepare([{"image": png}], tok_ref, max_pixels=1000)[0]
    assert big["status"] == QUARANTINED and big["reason"] == "60x40 pixels exceed max_pixels 1000"


def test_exif_orientation_is_applied_before_cropping(tok_ref):
    img = halves((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = prepare([{"image": encode(img, "JPEG", quality=95, exif=exif)}], tok_ref)[0]
    assert (out["width"], out["height"]) == (40, 60)
    pixels = np.frombuffer(out["pixels"], np.uint8).reshape(S, S, 3).astype(int)
    # After the rotation red is on top and blue at the bottom.
    assert pixels[2, S // 2, 0] > 200 and pixels[2, S // 2, 2] < 60
    assert pixels[-3, S // 2, 2] > 200 and pixels[-3, S // 2, 0] < 60


def test_modes_convert_to_rgb_and_transparency_becomes_white(tok_ref):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    grey = Image.new("L", (40, 40), 90)
    palette = Image.new("RGB", (40, 40), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = prepare([{"image": encode(i)} for i in (rgba, grey, palette)], tok_ref)
    first = [tuple(np.frombuffer(r["pixels"], np.uint8).reshape(S, S, 3)[0, 0]) for r in out]
    assert first == [(255, 255, 255), (90, 90, 90), (0, 200, 0)]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds one row: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    rows = zlib.compress(b"\0" * (1 + width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_16_bit_cmyk_and_alpha_images_are_converted_to_8_bit_rgb_and_kept(tok_ref):
    ramp = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    pgm16 = b"P5 40 40 65535\n" + ramp.astype(">u2").tobytes()  # PIL opens it as mode I
    grey_alpha = Image.new("LA", (40, 40), (90, 255))
    grey_alpha.putpixel((0, 0), (90, 0))
    images = [
        encode(Image.fromarray(ramp)),  # 16-bit grey PNG: PIL's I;16
        pgm16,
        encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95),
        encode(Image.new("CMYK", (40, 40), (255, 0, 255, 0)), "TIFF"),
        encode(grey_alpha),
        encode(Image.new("1", (40, 40), 1)),
    ]
    assert [Image.open(io.BytesIO(b)).mode for b in images] == ["I;16", "I", "CMYK", "CMYK", "LA", "1"]
    out = prepare([{"image": b} for b in images], tok_ref)
    assert [r["status"] for r in out] == [OK] * len(images)
    pixels = [np.frombuffer(r["pixels"], np.uint8).reshape(S, S, 3).astype(int) for r in out]
    for ramped in pixels[:2]:  # scaled, not clipped to white above 255
        assert abs(ramped.mean() - 127.5) < 2 and ramped[0, 0, 0] < 8 and ramped[-1, -1, 0] > 247
    assert tuple(pixels[2][S // 2, S // 2]) == pytest.approx((255, 0, 0), abs=6)
    assert tuple(pixels[3][S // 2, S // 2]) == (0, 255, 0)
    assert tuple(pixels[4][S // 2, S // 2]) == (90, 90, 90)
    assert tuple(pixels[5][S // 2, S // 2]) == (255, 255, 255)


def test_bombs_and_float_pixels_are_quarantined_and_tiny_or_thin_images_kept_or_filtered(tok_ref):
    images = [
        png_header_only(100_000, 100_000),  # over PIL's own cap: it refuses to open it
        png_header_only(9_000, 9_000),  # under PIL's cap, over max_pixels
        encode(Image.fromarray(np.full((40, 40), 0.5, np.float32)), "TIFF"),
        encode(Image.new("RGB", (1, 1), (10, 20, 30))),
        encode(Image.new("RGB", (4000, 1), (10, 20, 30))),
    ]
    out = prepare([{"image": b} for b in images], tok_ref, max_pixels=40_000_000)
    assert [(r["status"], r["reason"]) for r in out] == [
        (QUARANTINED, "decompression bomb: Image size (10000000000 pixels) exceeds limit of 178956970 "
         "pixels, could be decompression bomb DOS attack."),
        (QUARANTINED, "9000x9000 pixels exceed max_pixels 40000000"),
        (QUARANTINED, "floating-point pixels (mode F) have no known 8-bit scale"),
        (FILTERED, "min_side"),
        (FILTERED, "min_side"),
    ]  # fmt: skip
    kept = prepare([{"image": b} for b in images[3:]], tok_ref, filters={"min_side": 1, "max_aspect": 1e4})
    assert [r["status"] for r in kept] == [OK, OK]
    for r in kept:  # one pixel, or the centre of a one-pixel line, fills the square
        assert (np.frombuffer(r["pixels"], np.uint8).reshape(S, S, 3) == (10, 20, 30)).all()


def test_filters_reject_by_size_aspect_and_caption_and_name_the_filter(tok_ref):
    ok = encode(halves((60, 40)))
    rows = [
        {"image": ok},
        {"image": encode(Image.new("RGB", (20, 40)))},  # shorter side 20 < 24
        {"image": encode(Image.new("RGB", (200, 40)))},  # aspect 5 > 3
        {"image": ok, "caption": "  "},
        {"image": ok, "caption": "x" * 51},
    ]
    out = prepare(rows, tok_ref, filters={"min_side": 24, "max_aspect": 3.0, "max_caption_chars": 50})
    assert [(r["status"], r["reason"]) for r in out] == [
        (OK, None),
        (FILTERED, "min_side"),
        (FILTERED, "max_aspect"),
        (FILTERED, "caption_length"),
        (FILTERED, "caption_length"),
    ]


def test_resize_and_centre_crop_keep_the_middle_of_the_image(tok_ref):
    img = Image.new("RGB", (120, 40), (0, 0, 255))
    img.paste(Image.new("RGB", (40, 40), (255, 0, 0)), (40, 0))  # the centre square is red
    out = prepare([{"image": encode(img)}], tok_ref)[0]
    pixels = np.frombuffer(out["pixels"], np.uint8).reshape(S, S, 3).astype(int)
    assert (pixels[..., 0] > 200).all() and (pixels[..., 2] < 60).all()


def test_perceptual_hash_is_close_for_a_re_encoded_picture_and_far_for_another():
    rng = np.random.default_rng(0)
    a = np.repeat(np.repeat(rng.integers(0, 255, (8, 8, 3)), 8, 0), 8, 1).astype(np.uint8)
    jpeg = np.asarray(Image.open(io.BytesIO(encode(Image.fromarray(a), "JPEG", quality=70))))
    b = np.repeat(np.repeat(rng.integers(0, 255, (8, 8, 3)), 8, 0), 8, 1).astype(np.uint8)
    h = phash(np.stack([a, jpeg, b]))
    d = hamming(h, h)
    assert d[0, 1] <= 4 and d[0, 2] >= 16


def test_edit_rows_get_every_rounds_target_cropped_like_the_source_and_text_ids(tok_ref):
    """Targets of any size and format are decoded and centre-cropped as the source is."""
    targets = [
        encode(halves((60, 40), (0, 160, 0))),
        encode(halves((40, 40), (0, 0, 255), (255, 255, 0)), "JPEG", quality=95),
        encode(Image.new("L", (50, 70), 90)),
    ]
    vqa = [{"question": "What colour is the circle?", "answer": "red"}]
    row = {
        "image": encode(halves()),
        "meta": json.dumps({"vqa": vqa}),
        "edit_instruction": ["a red circle", "two blue squares", "red"],
        "edit_images": targets,
    }
    out = prepare([row], tok_ref)[0]
    assert out["status"] == OK and len(out["edit_pixels"]) == 3
    for target, pixels in zip(targets, out["edit_pixels"]):
        expected = square_pixels(Image.open(io.BytesIO(target)), S)
        assert np.array_equal(np.frombuffer(pixels, np.uint8).reshape(S, S, 3), expected)
    assert len({bytes(p) for p in out["edit_pixels"]}) == 3  # each round its own target
    tok = text_tokenizer.load(tok_ref)
    assert tok.decode(out["text_ids"]) == "a red circle"
    assert out["edit_instruction"] == row["edit_instruction"]
    assert [tok.decode(e) for e in out["edit_instruction_ids"]] == out["edit_instruction"]
    assert [tok.decode(q) for q in out["vqa_question_ids"]] == [vqa[0]["question"]] and out["vqa"] == vqa


def test_a_chain_with_a_target_that_does_not_decode_is_quarantined_with_its_round(tok_ref):
    good, big = encode(halves()), encode(Image.new("RGB", (200, 200)))
    rows = [
        {"image": good, "edit_instruction": ["a", "b"], "edit_images": [good, b"not an image"]},
        {"image": good, "edit_instruction": ["a"], "edit_images": [big]},
    ]
    out = prepare(rows, tok_ref, max_pixels=10_000)
    assert [r["status"] for r in out] == [QUARANTINED, QUARANTINED]
    assert out[0]["reason"] == "edit round 1 target: not a readable image (UnidentifiedImageError)"
    assert out[1]["reason"] == "edit round 0 target: 200x200 pixels exceed max_pixels 10000"
    assert out[0]["edit_pixels"] is None and out[0]["edit_instruction_ids"] is None


def test_an_edit_row_without_a_caption_passes_the_caption_filter_without_text_ids(tok_ref):
    row = {
        "image": encode(halves()),
        "caption": None,
        "edit_instruction": ["red"],
        "edit_images": [encode(halves())],
    }
    (out,) = prepare([row], tok_ref, filters={"min_caption_chars": 3})
    assert out["status"] == OK and out["text_ids"] is None and len(out["edit_pixels"]) == 1
    assert text_tokenizer.load(tok_ref).decode(out["edit_instruction_ids"][0]) == "red"


def test_marker_rows_and_rows_without_edit_pass_through(tok_ref):
    rows = [{"image": encode(halves())}, {"key": None, "status": END, "caption": None, "shard_rows": 1}]
    out = prepare(rows, tok_ref)
    assert out[0]["edit_pixels"] is None and out[0]["edit_instruction"] is None
    assert (out[1]["status"], out[1]["shard_rows"], out[1]["pixels"]) == (END, 1, None)


def test_a_filter_writes_only_its_predicate():
    class EvenKeys(Filter):
        name = "even_keys"

        def keep(self, batch, idx):
            return np.array([int(batch.column("key")[i][1:]) % 2 == 0 for i in idx])

    batch = Batch(source([{}, {}, {}, {"status": QUARANTINED, "reason": "earlier"}]))
    EvenKeys()(batch)
    assert list(batch.status) == [OK, FILTERED, OK, QUARANTINED]
    assert batch.reason == [None, "even_keys", None, "earlier"]
