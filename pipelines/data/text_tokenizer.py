"""The project's text tokenizer: a byte-level BPE (Hugging Face `tokenizers`) trained on the
corpus captions, with the unified sequence format's special tokens reserved first, so their
ids are 0..6 (models/special_tokens.py) whatever the corpus.

It is saved beside the shards as tokenizer/bpe-<fingerprint>.json, where the fingerprint is
a hash of its JSON: every output row records it, and the manifest points to the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from uniloom.models.special_tokens import SPECIAL_TOKENS
from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.fields import json_object
from uniloom.pipelines.data.fs import join, open_fs, to_uri, write_atomic
from uniloom.pipelines.data.manifest import Manifest
from uniloom.pipelines.data.readers import InputShard, ShardError, read_shard
from uniloom.pipelines.data.stages import OK, Batch, Stage
from uniloom.pipelines.errors import UniloomError

_LOADED: dict[str, Any] = {}  # fingerprint -> Tokenizer, one load per worker process


@dataclass(frozen=True)
class TextTokenizerRef:
    """Where a tokenizer is and what it is: enough for a worker to load it once."""

    uri: str
    fingerprint: str
    storage_options: dict[str, Any]


def train_bpe(captions: Iterable[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # reserved first: ids 0..len-1, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer)
    check_special_ids(tok, "the trained BPE")
    return tok


def check_special_ids(tok, name: str) -> None:
    for want, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != want:
            raise UniloomError(f"{name}: special token {token} has id {got}, expected {want}")


def fingerprint(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def save_beside(tok, out: str, storage_options: dict[str, Any]) -> TextTokenizerRef:
    fs, root = open_fs(out, storage_options)
    fp = fingerprint(tok)
    path = join(root, "tokenizer", f"bpe-{fp}.json")
    if not fs.exists(path):
        write_atomic(fs, root, path, tok.to_str(pretty=True).encode())
    return TextTokenizerRef(to_uri(fs, path), fp, storage_options)


def load_ref(uri: str, storage_options: dict[str, Any]) -> TextTokenizerRef:
    """Check a tokenizer file (given by path or recorded in a manifest) and describe it."""
    tok = _read(uri, storage_options)
    check_special_ids(tok, uri)
    return TextTokenizerRef(uri, fingerprint(tok), storage_options)


def _read(uri: str, storage_options: dict[str, Any]):
    from tokenizers import Tokenizer

    fs, path = open_fs(uri, storage_options)
    try:
        text = fs.cat_file(path).decode()
        return Tokenizer.from_str(text)
    except FileNotFoundError:
        raise UniloomError(f"text tokenizer {uri} does not exist") from None
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UniloomError(f"text tokenizer {uri} is not a tokenizers JSON file ({e})") from None


def load(ref: TextTokenizerRef):
    """The tokenizer, loaded once per process."""
    if ref.fingerprint not in _LOADED:
        _LOADED[ref.fingerprint] = _read(ref.uri, ref.storage_options)
    return _LOADED[ref.fingerprint]


def load_from_output(out: str, storage_options: dict[str, Any] | None = None):
    """The tokenizer that a data run used for the shards under `out` (for training)."""
    fs, root = open_fs(out, storage_options)
    recorded = json.loads(fs.cat_file(join(root, "_manifest.json")))["text_tokenizer"]
    uri = join(to_uri(fs, root), recorded["path"]) if "path" in recorded else recorded["uri"]
    return _read(uri, storage_options or {})


class TokenizeText(Stage):
    """Caption, edit instructions (every round of the chain) and VQA pairs -> token ids
    (one Rust batch call each)."""

    name = "tokenize_text"

    def __init__(self, ref: TextTokenizerRef):
        self.ref = ref

    def process(self, batch: Batch, idx: np.ndarray) -> None:
        tok = load(self.ref)
        n = batch.n

        def ids(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else []

        captions = batch.column("caption")
        text_ids: list = [None] * n
        captioned = [i for i in idx.tolist() if captions[i] is not None]  # edit samples may have none
        for i, e in zip(captioned, ids([captions[i] for i in captioned])):
            text_ids[i] = e
        metas = [batch.values["meta_obj"][i] or {} for i in idx.tolist()]
        edit_ids: list = [None] * n
        vqa: list = [None] * n
        q_ids: list = [None] * n
        a_ids: list = [None] * n
        instructions = batch.column("edit_instruction")
        chains = [(i, instructions[i]) for i in idx.tolist() if instructions[i]]
        encoded = iter(ids([t for _, texts in chains for t in texts]))
        for i, texts in chains:
            edit_ids[i] = [next(encoded) for _ in texts]
        rows, questions, answers = [], [], []
        for i, m in zip(idx.tolist(), metas):
            pairs = [
                p for p in m.get("vqa") or [] if isinstance(p, dict) and "question" in p and "answer" in p
            ]
            if pairs:
                vqa[i] = [{"question": str(p["question"]), "answer": str(p["answer"])} for p in pairs]
                q_ids[i], a_ids[i] = [], []
                rows += [i] * len(pairs)
                questions += [p["question"] for p in vqa[i]]
                answers += [p["answer"] for p in vqa[i]]
        for i, q, a in zip(rows, ids(questions), ids(answers)):
            q_ids[i].append(q)
            a_ids[i].append(a)
        batch.values.update(
            text_ids=text_ids,
            edit_instruction_ids=edit_ids,
            vqa=vqa,
            vqa_question_ids=q_ids,
            vqa_answer_ids=a_ids,
        )


def _bpe_params(d: DataConfig) -> dict[str, int]:
    return {
        "vocab_size": d.bpe_vocab_size,
        "min_frequency": d.bpe_min_frequency,
        "max_captions": d.bpe_max_captions,
    }


def _vqa_texts(meta: str | None) -> list[str]:
    """The VQA pairs of a sample's JSON: text the model reads too."""
    texts = []
    for pair in json_object(meta).get("vqa") or []:
        if isinstance(pair, dict):
            texts += [pair.get("question"), pair.get("answer")]
    return [t for t in texts if isinstance(t, str)]


def training_texts(shards: list[InputShard], d: DataConfig) -> Iterator[str]:
    """What the BPE trains on: captions, edit instructions and VQA pairs, in shard order,
    from at most bpe_max_captions samples. Texts outside the caption length filter's
    bounds are left out: such a caption never reaches the output, and BPE training time
    grows with the square of a word's length (one 100,000-character word took 37 s here,
    a megabyte would take hours)."""
    low, high = d.filters.min_caption_chars, d.filters.max_caption_chars
    left = d.bpe_max_captions
    for shard in shards:
        try:
            for block in read_shard(shard, d):
                ok = block.filter(pc.equal(block.column("status"), OK)).slice(0, left)
                columns = (ok.column(c).to_pylist() for c in ("caption", "edit_instruction", "meta"))
                for caption, instructions, meta in zip(*columns):
                    texts = [caption, *(instructions or []), *_vqa_texts(meta)]
                    yield from (t for t in texts if t is not None and low <= len(t.strip()) <= high)
                left -= ok.num_rows
                if left == 0:
                    return
        except ShardError:
            continue  # the run reports it when it reads the shard


def resolve(
    d: DataConfig, manifest: Manifest, shards: list[InputShard], train: bool
) -> TextTokenizerRef | None:
    """The configured tokenizer; else the one recorded beside the shards if it was trained
    with the same settings; else (when `train`) a new one trained on the captions."""
    if d.text_tokenizer:
        ref = load_ref(d.text_tokenizer, d.storage_options)
        manifest.data["text_tokenizer"] = {"uri": ref.uri, "fingerprint": ref.fingerprint}
        return ref
    recorded = manifest.data.get("text_tokenizer") or {}
    if recorded.get("trained_with") == _bpe_params(d):
        uri = join(manifest.uri, recorded["path"])
        if manifest.fs.exists(join(manifest.root, recorded["path"])):
            return load_ref(uri, d.storage_options)
    if not train:
        return None
    tok = train_bpe(training_texts(shards, d), d.bpe_vocab_size, d.bpe_min_frequency)
    ref = save_beside(tok, manifest.uri, d.storage_options)
    manifest.data["text_tokenizer"] = {
        "path": f"tokenizer/bpe-{ref.fingerprint}.json",  # beside the shards: moves with them
        "fingerprint": ref.fingerprint,
        "trained_with": _bpe_params(d),
    }
    manifest.save()
    return ref
