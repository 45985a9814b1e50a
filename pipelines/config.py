"""Typed configuration: dataclasses filled from a YAML preset, an optional YAML file and
`--set a.b.c=value` overrides, in that order.

Every key is checked against the dataclass fields and every value against the field's
type, so a typo or a wrongly typed value fails at start-up with the key's full name.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.models.tuna_config import TunaConfig
from uniloom.models.unitok_config import UniTokConfig
from uniloom.models.univision_config import UniVisionConfig
from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.errors import ConfigError
from uniloom.pipelines.evaluate.config import EvalConfig
from uniloom.pipelines.tokenizer.config import TokenizerConfig
from uniloom.pipelines.train.config import TrainConfig


@dataclass
class CorpusConfig:
    """The procedurally generated compositional corpus (pipelines/corpus)."""

    num: int = 2000
    shards: int = 8
    size: int = 64  # rendered image side in pixels
    seed: int = 0
    max_objects: int = 4


# What MLflow can track to (its built-in stores; a SQLAlchemy URI may name a driver:
# postgresql+psycopg2://...). Checked when the config loads, so a mistyped URI is a config
# error rather than an MLflow exception in the middle of a stage.
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                    "databricks-uc", "uc")  # fmt: skip


@dataclass
class TrackingConfig:
    """MLflow: an empty tracking_uri means a SQLite store inside the workspace."""

    tracking_uri: str = ""
    experiment: str = "uniloom"

    def __post_init__(self) -> None:
        scheme, sep, _ = self.tracking_uri.partition(":")
        if sep and "/" not in scheme and scheme.split("+")[0].lower() not in TRACKING_SCHEMES:
            raise ValueError(
                f"tracking_uri: unknown scheme '{scheme}:' (MLflow tracks to {', '.join(TRACKING_SCHEMES)}, "
                "or a local path)"
            )


@dataclass
class RayConfig:
    """Where Ray runs: an empty address starts a local instance on this machine."""

    address: str = ""
    num_cpus: int = 0  # 0: let Ray count the cores


@dataclass
class UniloomConfig:
    preset: str = "tiny"
    workspace: str = "workspace"  # a local folder or a URL (s3://bucket/prefix): pipelines/workspace.py
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mingtok: MingTokConfig = field(default_factory=MingTokConfig)
    unitok: UniTokConfig = field(default_factory=UniTokConfig)
    tuna: TunaConfig = field(default_factory=TunaConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: UniVisionConfig = field(default_factory=UniVisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def preset_names() -> list[str]:
    folder = resources.files("uniloom.pipelines") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return data


def _preset_text(name: str) -> str:
    return (resources.files("uniloom.pipelines") / "presets" / f"{name}.yaml").read_text()


def load_preset(name: str, _children: tuple[str, ...] = ()) -> dict[str, Any]:
    """The preset's mapping; `extends: OTHER` at its top level merges it over preset OTHER
    (mappings key by key, everything else replaced)."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}' (choose from: {', '.join(names)})")
    data = _read_yaml(_preset_text(name), f"preset '{name}'")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if parent in (*_children, name):
        raise ConfigError(f"preset '{name}' extends '{parent}', which extends it back")
    return _deep_merge(load_preset(str(parent), (*_children, name)), data)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in that type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping for section {tp.__name__}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from `data`, defaults filling what `data` omits."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section '{prefix or cls.__name__}': {e}") from None


# What a tokenizer kind changes in the unified model's defaults, under the user's settings:
# TUNA's paper weighs flow matching 1.0 and next-token prediction 0.2.
# Coarse codes are MingTok's (its latents' k-means centres): off for the other kinds.
KIND_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "unitok": {"coarse_codes": 0},
    "tuna": {"text_loss_weight": 0.2, "coarse_codes": 0},
}
# Keys that copy another (what the backbone reads is what the tokenizer writes): each is
# set from its source, so the two never disagree, and is never set by hand.
DERIVED = {
    "model.image_kind": "tokenizer.kind",
    "model.num_codebooks": "unitok.num_codebooks",
    "model.codebook_size": "unitok.codebook_size",
    "tuna.llm_width": "model.hidden",
}


def load_config(
    preset: str = "tiny", config_file: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> UniloomConfig:
    """The preset, the tokenizer kind's model defaults, the config file, the overrides, in
    that order; then the DERIVED keys from their sources."""
    data = load_preset(preset)
    data["preset"] = preset
    user: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path}: not a text file ({e.__class__.__name__})") from None
        user = _read_yaml(text, str(path))
    for text in overrides:
        user = _deep_merge(user, parse_override(text))
    kind = _deep_merge(data, user).get("tokenizer", {}).get("kind", "mingtok")
    data = _deep_merge(data, {"model": KIND_MODEL_DEFAULTS.get(kind, {}) if isinstance(kind, str) else {}})
    given = flatten(_deep_merge(data, user))
    for key, source in DERIVED.items():
        if key in given:
            raise ConfigError(f"config key '{key}' follows {source}: set {source} instead")
    return _derive(build(UniloomConfig, _deep_merge(data, user)))


def _derive(cfg: UniloomConfig) -> UniloomConfig:
    sections = set()
    for key, source in DERIVED.items():
        section, name = key.split(".")
        value: Any = cfg
        for part in source.split("."):
            value = getattr(value, part)
        setattr(getattr(cfg, section), name, value)
        sections.add(section)
    for section in sorted(sections):
        try:
            getattr(cfg, section).__post_init__()  # the section's checks, on the copied values
        except ValueError as e:
            raise ConfigError(f"config section '{section}': {e}") from None
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params and fingerprints use."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out
