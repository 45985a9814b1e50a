"""The tokenizer's corpus readers: a sample without an image is an error naming it, both
for the held-out/calibration reader and for the training tars' caption pass, which runs
before training starts."""

import io
import re

import pytest
from PIL import Image

from uniloom.pipelines.corpus.synth import write_tar
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.data import read_tars
from uniloom.pipelines.tokenizer.train import read_captions


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_sample_without_an_image_is_an_error_that_names_it(tmp_path):
    good = tmp_path / "shapes-00000.tar"
    write_tar(good, [("a", {"png": png(), "txt": b"red", "json": b"{}"})])
    bad = tmp_path / "shapes-00001.tar"
    write_tar(bad, [("b", {"png": png(), "txt": b"red"}), ("c", {"txt": b"no image", "json": b"{}"})])
    assert read_tars([good], 8).keys == ["a"] and read_captions([good]) == ["red"]
    message = f"{bad}: 1 sample(s) without an image (png/jpg/jpeg): c (json, txt)"
    with pytest.raises(UniloomError, match=re.escape(message)):
        read_tars([good, bad], 8)
    with pytest.raises(UniloomError, match="sample.s. without an image"):
        read_captions([good, bad])
