"""The byte-level BPE: special tokens first, lossless round trips, stable fingerprints."""

import pytest

from uniloom.models.special_tokens import SPECIAL_TOKENS
from uniloom.pipelines.data import text_tokenizer
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
