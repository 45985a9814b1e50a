"""Image tokenization: MingTok latents in a Ray actor pool, one model load per actor.

Only the low-level encoder is materialised: the model is built on the meta device and the
encoder's weights (plus the latent normalisation buffers) are assigned from the
safetensors file, so an actor of the paper preset does not hold the two decoders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.data.fs import open_fs, to_uri
from uniloom.pipelines.data.schema import fixed_binary, fixed_binary_lists
from uniloom.pipelines.data.stages import OK
from uniloom.pipelines.errors import UniloomError

HOW_TO = (
    "train the image tokenizer with `uniloom tokenizer train` and pass its weights with "
    "--set data.tokenizer_weights=PATH.safetensors"
)
CONFIG_KEY = "mingtok_config"  # safetensors metadata written by pipelines/tokenizer/weights.py
ENCODER_PREFIXES = ("encoder.",)
ENCODER_BUFFERS = ("latent_shift", "latent_scale")


def read_weights(uri: str, storage_options: dict[str, Any]) -> bytes:
    fs, path = open_fs(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise UniloomError(f"MingTok weights {uri} do not exist: {HOW_TO}") from None


def weights_config(data: bytes, name: str) -> MingTokConfig | None:
    """The MingTokConfig that `uniloom tokenizer train` stores in the file's metadata
    (read from the safetensors header, without torch), or None for a bare state dict."""
    from uniloom.pipelines.config import build

    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        return build(MingTokConfig, json.loads(meta[CONFIG_KEY]), "mingtok") if CONFIG_KEY in meta else None
    except (ValueError, UnicodeDecodeError) as e:
        raise UniloomError(f"MingTok weights {name} are not a safetensors file ({e})") from None


def resolve_weights(cfg) -> tuple[str, bytes, MingTokConfig]:
    """(where, bytes, architecture) of the MingTok the data stage encodes with: the
    configured file, else the tokenizer stage's export in the workspace. The file's own
    config wins over the preset's `mingtok` section, so any exported tokenizer works."""
    uri = cfg.data.tokenizer_weights
    if not uri:
        from uniloom.pipelines.tokenizer.weights import default_path

        uri = str(default_path(cfg))
        fs, path = open_fs(uri, {})
        if not fs.exists(path):
            raise UniloomError(
                f"no MingTok weights: data.tokenizer_weights is not set and {uri} does not exist; {HOW_TO}"
            )
    data = read_weights(uri, cfg.data.storage_options)
    uri = to_uri(*open_fs(uri, cfg.data.storage_options))  # absolute: recorded in the manifest
    return uri, data, weights_config(data, uri) or cfg.mingtok


def fingerprint(cfg: MingTokConfig, weights: bytes) -> str:
    """Hash of the weights and of the architecture they are loaded into."""
    h = hashlib.sha256(weights)
    h.update(repr(sorted(asdict(cfg).items())).encode())
    return h.hexdigest()[:16]


def load_encoder(cfg: MingTokConfig, weights: bytes, name: str, device: str = "cpu"):
    """MingTok whose `encode` works: encoder and latent buffers loaded, decoders on meta."""
    import torch
    from safetensors.torch import load as load_safetensors

    from uniloom.models.mingtok import MingTok

    try:
        state = load_safetensors(weights)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise UniloomError(f"MingTok weights {name} are not a safetensors file ({e})") from None
    wanted = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES) or k in ENCODER_BUFFERS}
    with torch.device("meta"):
        model = MingTok(cfg)
    expected = {k for k in model.state_dict() if k.startswith(ENCODER_PREFIXES) or k in ENCODER_BUFFERS}
    if missing := sorted(expected - set(wanted)):
        raise UniloomError(
            f"MingTok weights {name} do not fit the config's mingtok section: "
            f"{len(missing)} encoder tensors are missing, e.g. {missing[0]}"
        )
    try:
        model.load_state_dict(wanted, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UniloomError(
            f"MingTok weights {name} do not fit the config's mingtok section: {first}"
        ) from None
    if device != "cpu":
        model.encoder.to(device)
        for buffer in ENCODER_BUFFERS:
            setattr(model, buffer, getattr(model, buffer).to(device))
    return model


class Encoder:
    """Actor for map_batches: prepared rows -> rows with `latents` (and `edit_latents`, one
    list per edit chain), pixels dropped. Torch threads are set here: each actor owns that
    many cores."""

    def __init__(
        self,
        mingtok: dict,
        weights_uri: str,
        storage_options: dict,
        exec_cfg: dict,
        latent_dtype: str,
        precision: str = "auto",
    ):
        import torch

        from uniloom.pipelines.precision import resolve

        torch.set_num_threads(exec_cfg["torch_threads"])
        self.cfg = MingTokConfig(**mingtok)
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
        self.dtype = np.dtype(latent_dtype)
        # On a GPU each batch of pixels goes through pinned host memory, so its copy to the
        # GPU runs asynchronously (a pageable array is staged by the driver first).
        S = self.cfg.image_size
        self.staging = (
            torch.empty((self.batch, S, S, 3), dtype=torch.uint8, pin_memory=True)
            if self.device == "cuda"
            else None
        )

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 -> latents (n, N, L) in the output dtype."""
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
                out.append(self.model.encode(x).float().cpu().numpy())
        return np.concatenate(out).astype(self.dtype, copy=False)

    def latents(self, column: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
        S = self.cfg.image_size
        shape = (self.cfg.num_tokens, self.cfg.latent_dim)
        result = np.zeros((n, *shape), dtype=self.dtype)
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
        item = pa.binary(self.cfg.num_tokens * self.cfg.latent_dim * self.dtype.itemsize)
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


def save_random_weights(cfg: MingTokConfig, path: str, seed: int = 0) -> str:
    """A seeded, randomly initialised MingTok as safetensors, with its config in the
    metadata like an exported tokenizer: what benches and tests encode with (the
    pipeline's speed and correctness do not depend on the weight values)."""
    import torch
    from safetensors.torch import save_file

    from uniloom.models.mingtok import MingTok

    torch.manual_seed(seed)
    save_file(MingTok(cfg).state_dict(), path, metadata={CONFIG_KEY: json.dumps(asdict(cfg))})
    return path
