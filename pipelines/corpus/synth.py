"""Write the embedded corpus as real webdataset tar shards.

Each sample is `{key}.json` (ground truth), `{key}.png` and `{key}.txt` (caption), and its
edit chain in the layout public editing sets use (pipelines/data/fields.py): every round's
target image as `{key}.tgt<r>.png`, which the JSON's `edits` name beside their instructions
(`{"instruction": ..., "target": "tgt0.png", ...}`), so the data stage reads the chain like
any other editing corpus, never knowing about scenes. Samples are in key order. Tars carry fixed metadata (mtime 0, owner 0), so a seed always produces
byte-identical shards and the data stage's content fingerprints stay stable.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from uniloom.pipelines.config import CorpusConfig
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import sample_scene, scene_objects
from uniloom.pipelines.errors import UniloomError


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {ext: bytes}) samples into `path` atomically; returns the count."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, files in samples:
                for ext in sorted(files):
                    _tar_add(tar, f"{key}.{ext}", files[ext])
                count += 1
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UniloomError(f"cannot write {path}: {e.strerror or e}") from None
    return count


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def synth_sample(cfg: CorpusConfig, index: int) -> tuple[str, dict[str, bytes]]:
    scene = sample_scene(cfg.seed, index, cfg.max_objects)
    key = f"{cfg.seed:04d}-{index:08d}"
    edits = [{**edit, "target": f"tgt{r}.png"} for r, edit in enumerate(scene["edits"])]
    meta = {"key": key, "seed": cfg.seed, "index": index, "size": cfg.size, **scene, "edits": edits}
    targets = {e["target"]: _png(render(scene_objects(e["objects"]), cfg.size)) for e in edits}
    return key, {
        "json": json.dumps(meta, sort_keys=True).encode(),
        "png": _png(render(scene_objects(scene["objects"]), cfg.size)),
        "txt": scene["caption"].encode(),
        **targets,
    }


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UniloomError(f"cannot create output directory {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UniloomError(f"output directory {out} is not writable")


def prepare(cfg: CorpusConfig, out: Path) -> None:
    """Validate the corpus config and make `out` writable, before any work starts."""
    if cfg.num < 1:
        raise UniloomError(f"--num must be at least 1, got {cfg.num}")
    if not 1 <= cfg.shards <= cfg.num:
        raise UniloomError(f"--shards must be between 1 and --num ({cfg.num}), got {cfg.shards}")
    if cfg.size < 16:
        raise UniloomError(f"--size must be at least 16 pixels, got {cfg.size}")
    if cfg.max_objects < 1:
        raise UniloomError(f"max_objects must be at least 1, got {cfg.max_objects}")
    _check_out_dir(out)


def synthesize(cfg: CorpusConfig, out: Path, progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write `cfg.num` samples into `cfg.shards` tars under `out`; returns their paths."""
    prepare(cfg, out)
    bounds = np.linspace(0, cfg.num, cfg.shards + 1).astype(int)
    jobs = [
        (cfg, out / f"shapes-{s:05d}.tar", int(lo), int(hi))
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers == 1:
        done = map(_write_shard, jobs)
    else:
        # Shards are independent and samples are seeded per index: one process per core.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        done = pool.map(_write_shard, jobs)
    try:
        for count in done:
            if progress:
                progress(count)
    finally:
        if workers > 1:
            pool.shutdown()
    return [job[1] for job in jobs]


def _write_shard(job: tuple[CorpusConfig, Path, int, int]) -> int:
    cfg, path, lo, hi = job
    return write_tar(path, (synth_sample(cfg, i) for i in range(lo, hi)))


def photo_captions() -> dict[str, str]:
    text = (resources.files("uniloom.pipelines") / "assets" / "photos.yaml").read_text()
    return yaml.safe_load(text)


def write_photos(out: Path) -> Path:
    """The real-photo split: scikit-image's sample photographs as JPEG, hand captioned."""
    import skimage.data

    _check_out_dir(out)

    def samples():
        for name, caption in sorted(photo_captions().items()):
            pixels = getattr(skimage.data, name)()
            if pixels.dtype == bool:
                pixels = pixels.astype(np.uint8) * 255
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
            meta = {"key": f"photo-{name}", "source": f"skimage.data.{name}", "kind": "photo"}
            yield (
                f"photo-{name}",
                {
                    "jpg": buf.getvalue(),
                    "txt": caption.encode(),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                },
            )

    path = out / "photos-00000.tar"
    write_tar(path, samples())
    return path
