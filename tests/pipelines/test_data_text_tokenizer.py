"""The byte-level BPE: special tokens first, lossless round trips, stable fingerprints."""

import io
import json
import tarfile

import pytest
from PIL import Image

from uniloom.models.special_tokens import SPECIAL_TOKENS
from uniloom.pipelines.data import text_tokenizer
from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.discovery import discover
from uniloom.pipelines.errors import UniloomError

TEXTS = ["a red circle to the left of a blue square", "three green triangles", "How many objects?"] * 10


def test_special_tokens_have_ids_zero_to_six_and_are_never_split():
    tok = text_tokenizer.train_bpe(TEXTS, 400, 2)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode(f"{SPECIAL_TOKENS[2]}hi{SPECIAL_TOKENS[1]}", add_special_tokens=False).ids
    assert ids[0] == 2 and ids[-1] == 1


def test_byte_level_round_trip_of_unseen_text():
    tok = text_tokenizer.train_bpe(TEXTS, 400, 2)
    for text in ("a red circle", "naïve café — 日本語 🙂", "  spaces  and\ttabs"):
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_saved_beside_the_shards_under_its_fingerprint_and_loaded_back(tmp_path):
    tok = text_tokenizer.train_bpe(TEXTS, 400, 2)
    ref = text_tokenizer.save_beside(tok, str(tmp_path), {})
    assert ref.uri == str(tmp_path / "tokenizer" / f"bpe-{ref.fingerprint}.json")
    again = text_tokenizer.load_ref(ref.uri, {})
    assert again.fingerprint == ref.fingerprint == text_tokenizer.fingerprint(tok)
    other = text_tokenizer.train_bpe(TEXTS + ["something else entirely"] * 5, 400, 2)
    assert text_tokenizer.fingerprint(other) != ref.fingerprint


def test_a_missing_or_broken_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(UniloomError, match="does not exist"):
        text_tokenizer.load_ref(str(tmp_path / "nope.json"), {})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UniloomError, match="not a tokenizers JSON file"):
        text_tokenizer.load_ref(str(tmp_path / "bad.json"), {})


def test_the_bpe_learns_only_from_texts_the_caption_filter_keeps(tmp_path):
    """A megabyte caption is filtered from the output, and BPE training time grows with the
    square of a word's length: it must not reach the trainer, nor must an oversized VQA text."""
    png = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(png, format="PNG")
    vqa = json.dumps({"vqa": [{"question": "What colour?", "answer": "xq" * 600}]}).encode()
    samples = {"a": b"a red square", "b": b"qz" * 5000, "c": b"  ", "d": b"red"}
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, caption in samples.items():
            members = {"png": png.getvalue(), "txt": caption, **({"json": vqa} if key == "d" else {})}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = DataConfig()
    texts = list(text_tokenizer.training_texts(discover([str(tmp_path)], cfg), cfg))
    assert texts == ["a red square", "red", "What colour?"]
    tok = text_tokenizer.train_bpe(texts * 20, 300, 2)
    assert not any("qz" in token or "xq" in token for token in tok.get_vocab())
