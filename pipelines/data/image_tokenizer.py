"""Image tokenization in a Ray actor pool, one model load per actor: each image becomes
its tokenizer kind's values (pipelines/tokenizer/kinds.py): MingTok or TUNA latents as
floats, UniTok codes as integers.

Only the encoding part is materialised: the model is built on the meta device and the
weights the kind encodes with (`Kind.encoder_prefixes`: MingTok's encoder and latent
normalisation, UniTok's encoder, projection and codebooks, TUNA's VAE encoder) are
assigned from the safetensors file, so an actor of the paper preset holds no decoder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from uniloom.pipelines.data.fs import open_fs, to_uri
from uniloom.pipelines.data.schema import fixed_binary, fixed_binary_lists
from uniloom.pipelines.data.stages import OK
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.kinds import KINDS, kind_for_config, kind_in

HOW_TO = (
    "train the image tokenizer with `uniloom tokenizer train` and pass its weights with "
    "--set data.tokenizer_weights=PATH.safetensors"
)


def read_weights(uri: str, storage_options: dict[str, Any]) -> bytes:
    fs, path = open_fs(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise UniloomError(f"tokenizer weights {uri} do not exist: {HOW_TO}") from None


def weights_config(data: bytes, name: str):
    """The tokenizer config (its type is its kind) that `uniloom tokenizer train` stores in
    the file's metadata (read from the safetensors header, without torch), or None for a
    bare state dict."""
    from uniloom.pipelines.config import build

    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        kind = kind_in(meta)
        return None if kind is None else build(kind.config_cls, json.loads(meta[kind.config_key]), kind.name)
    except (ValueError, UnicodeDecodeError) as e:
        raise UniloomError(f"tokenizer weights {name} are not a safetensors file ({e})") from None


def resolve_weights(cfg):
    """(where, bytes, architecture) of the tokenizer the data stage encodes with: the
    configured file, else the tokenizer stage's export in the workspace. The file's own
    config (and so its kind) wins over the preset's section of tokenizer.kind, so any
    exported tokenizer works; a bare state dict is read as tokenizer.kind's."""
    uri = cfg.data.tokenizer_weights
    if not uri:
        from uniloom.pipelines.tokenizer.weights import default_path

        uri = str(default_path(cfg))
        fs, path = open_fs(uri, cfg.data.storage_options)
        if not fs.exists(path):
            raise UniloomError(
                f"no tokenizer weights: data.tokenizer_weights is not set and {uri} does not exist; {HOW_TO}"
            )
    data = read_weights(uri, cfg.data.storage_options)
    uri = to_uri(*open_fs(uri, cfg.data.storage_options))  # absolute: recorded in the manifest
    return uri, data, weights_config(data, uri) or KINDS[cfg.tokenizer.kind].config(cfg)


def fingerprint(cfg, weights: bytes) -> str:
    """Hash of the weights and of the architecture they are loaded into."""
    h = hashlib.sha256(weights)
    h.update(repr(sorted(asdict(cfg).items())).encode())
    return h.hexdigest()[:16]


def load_encoder(cfg, weights: bytes, name: str, device: str = "cpu"):
    """The tokenizer of config `cfg` whose encoding (`Kind.values`) works: the kind's
    encoder_prefixes loaded, the rest on meta."""
    import torch
    from safetensors.torch import load as load_safetensors

    kind = kind_for_config(cfg)
    try:
        state = load_safetensors(weights)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise UniloomError(f"{kind.name} weights {name} are not a safetensors file ({e})") from None
    wanted = {k: v for k, v in state.items() if k.startswith(kind.encoder_prefixes)}
    with torch.device("meta"):
        model = kind.build(cfg)
    expected = {k for k in model.state_dict() if k.startswith(kind.encoder_prefixes)}
    if missing := sorted(expected - set(wanted)):
        raise UniloomError(
            f"{kind.name} weights {name} do not fit the config's {kind.name} section: "
            f"{len(missing)} encoder tensors are missing, e.g. {missing[0]}"
        )
    try:
        model.load_state_dict(wanted, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UniloomError(
            f"{kind.name} weights {name} do not fit the config's {kind.name} section: {first}"
        ) from None
    if device != "cpu":
        for prefix in kind.encoder_prefixes:
            part = getattr(model, prefix.rstrip("."))
            if isinstance(part, torch.nn.Module):
                part.to(device)
            else:  # a buffer
                setattr(model, prefix.rstrip("."), part.to(device))
    return model


class Encoder:
    """Actor for map_batches: prepared rows -> rows with `latents` (and `edit_latents`, one
    list per edit chain): the kind's values per image token, in the kind's dtype (codes as
    integers); pixels dropped. Torch threads are set here: each actor owns that many cores."""

    def __init__(
        self,
        tokenizer: dict,
        weights_uri: str,
        storage_options: dict,
        exec_cfg: dict,
        latent_dtype: str,
        precision: str = "auto",
        kind: str = "mingtok",  # `tokenizer` is this kind's config
    ):
        import torch

        from uniloom.pipelines.precision import resolve

        torch.set_num_threads(exec_cfg["torch_threads"])
        self.kind = KINDS[kind]
        self.cfg = self.kind.config_cls(**tokenizer)
        # An actor given GPUs (num_gpus = actor_gpus) encodes on one; it refuses to run
        # without the GPU it was given rather than encode on the CPU unnoticed.
        self.device = "cuda" if exec_cfg["actor_gpus"] > 0 else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UniloomError(
                f"data.exec.actor_gpus is {exec_cfg['actor_gpus']}, but the encoder actor sees no GPU"
            )
        self.precision = resolve(precision, self.device)
        weights = read_weights(weights_uri, storage_options)
        self.model = load_encoder(self.cfg, weights, weights_uri, self.device).eval()
        self.batch = exec_cfg["encode_batch"]
        self.dtype = np.dtype(self.kind.dtype(self.cfg, latent_dtype))
        self.shape = self.kind.token_shape(self.cfg)
        # On a GPU each batch of pixels goes through pinned host memory, so its copy to the
        # GPU runs asynchronously (a pageable array is staged by the driver first).
        S = self.cfg.image_size
        self.staging = (
            torch.empty((self.batch, S, S, 3), dtype=torch.uint8, pin_memory=True)
            if self.device == "cuda"
            else None
        )

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 -> values (n, N, X) in the output dtype."""
        import torch

        from uniloom.pipelines.precision import autocast

        out = []
        with torch.inference_mode(), autocast(self.precision, self.device):
            for start in range(0, len(pixels), self.batch):
                x = torch.from_numpy(pixels[start : start + self.batch])
                if self.staging is not None:  # the last batch's .cpu() waited for the GPU: it is free
                    x = self.staging[: len(x)].copy_(x)
                x = x.to(self.device, non_blocking=True)
                x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1]
                values = self.kind.values(self.model, x)
                out.append((values if values.dtype == torch.long else values.float()).cpu().numpy())
        return np.concatenate(out).astype(self.dtype, copy=False)

    def latents(self, column: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
        S = self.cfg.image_size
        result = np.zeros((n, *self.shape), dtype=self.dtype)
        if len(rows):
            flat = np.frombuffer(column.take(pa.array(rows)).buffers()[1], dtype=np.uint8)
            result[rows] = self.encode(flat.reshape(len(rows), S, S, 3))
        valid = np.zeros(n, dtype=bool)
        valid[rows] = True
        return fixed_binary(result, valid)

    def encode_chains(self, chains: list[np.ndarray | None]) -> list[np.ndarray | None]:
        """Per row (R, S, S, 3) uint8 targets or None -> (R, N, L) latents or None: every
        round of every chain in one pass through the encoder."""
        rows = [i for i, c in enumerate(chains) if c is not None]
        out: list[np.ndarray | None] = [None] * len(chains)
        if rows:
            latents = self.encode(np.concatenate([chains[i] for i in rows]))
            bounds = np.cumsum([len(chains[i]) for i in rows])[:-1]
            for i, part in zip(rows, np.split(latents, bounds)):
                out[i] = part
        return out

    def chain_latents(self, column: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
        """list<pixels> column -> list<latents> column for `rows`; other rows null."""
        S = self.cfg.image_size
        width = S * S * 3
        chains: list[np.ndarray | None] = [None] * n
        if len(rows):
            picked = column.take(pa.array(rows, pa.int64()))
            values = picked.flatten()
            flat = np.frombuffer(values.buffers()[1], dtype=np.uint8)
            flat = flat[values.offset * width : (values.offset + len(values)) * width].reshape(-1, S, S, 3)
            counts = picked.value_lengths().to_numpy(zero_copy_only=False)
            for i, part in zip(rows.tolist(), np.split(flat, np.cumsum(counts)[:-1])):
                chains[i] = part
        item = pa.binary(int(np.prod(self.shape)) * self.dtype.itemsize)
        return fixed_binary_lists(self.encode_chains(chains), item)

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        live = table.column("status").to_numpy(zero_copy_only=False) == OK
        pixels = table.column("pixels").combine_chunks()
        edits = table.column("edit_pixels").combine_chunks()
        has_edit = live & edits.is_valid().to_numpy(zero_copy_only=False)
        table = table.drop_columns(["pixels", "edit_pixels"])
        table = table.append_column("latents", self.latents(pixels, np.flatnonzero(live), n))
        return table.append_column("edit_latents", self.chain_latents(edits, np.flatnonzero(has_edit), n))


def save_random_weights(cfg, path: str, seed: int = 0) -> str:
    """A seeded, randomly initialised tokenizer of config `cfg` (its type is its kind) as
    safetensors, with its config in the metadata like an exported tokenizer: what benches
    and tests encode with (the pipeline's speed and correctness do not depend on the
    weight values)."""
    import torch
    from safetensors.torch import save_file

    kind = kind_for_config(cfg)
    torch.manual_seed(seed)
    save_file(kind.build(cfg).state_dict(), path, metadata={kind.config_key: json.dumps(asdict(cfg))})
    return path
