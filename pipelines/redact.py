"""Secrets out of everything uniloom logs or prints: MLflow params and tags, summaries,
progress lines and errors all pass through here.

A value is masked when its key names a secret (password, token, api_key, ... in any
nesting), when it sits under `storage_options` (fsspec credentials), or when it is the
userinfo or a secret-named query parameter of a URI inside a string.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Words that make a key name a secret wherever they appear in it.
SECRET_WORDS = frozenset(
    "secret secrets token password passwd passphrase credential credentials "
    "apikey oauth cookie signature sig sas".split()
)
# Words that name a secret only as the last word: an Authorization header, not an
# authorization_function; api_key and basic_auth, not a bare `key` (a row's key field, a
# Kubernetes toleration's key) or RAY_AUTH_MODE.
LAST_WORDS = frozenset({"authorization"})
SUFFIXES = frozenset({"key", "auth"})  # and only after another word
# Last words that make a name refer to a secret without holding it: token_path, secretName.
REFERENCES = frozenset({"name", "ref", "path", "file", "mode", "type"})
# Sections whose every value is treated as a secret.
SECRET_SECTIONS = frozenset({"storage_options"})

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_URI_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/?#\s'\"]*@")
_QUERY_PARAM = re.compile(r"([?&;])([^=&#\s'\"]+)=([^&#\s'\"]*)")
# `name=value` and `"name": "value"` pairs in free text (--set arguments, error reprs).
_ASSIGNMENT = re.compile(r"(?<![\w.?&;-])([\w.-]+)=([^\s&#'\"]+)")
_QUOTED_PAIR = re.compile(r"""(['"])([\w.-]+)\1(\s*:\s*)(['"])(.*?)\4""")
_BEARER = re.compile(r"(\b[Bb]earer\s+)[^\s'\"]+")


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", _CAMEL.sub("_", name).lower()) if w]


def is_secret_key(name: str) -> bool:
    """Whether a key, variable or parameter name names a secret value."""
    words = _words(str(name))
    if words and words[-1] in REFERENCES:
        return False
    if any(w in SECRET_WORDS for w in words):
        return True
    if words and (words[-1] in LAST_WORDS or (len(words) > 1 and words[-1] in SUFFIXES)):
        return True
    return "key" in words[1:-1] and words[-1] == "id"  # aws_access_key_id


def _secret_param(name: str) -> bool:
    return is_secret_key(name) or _words(name) in (["key"], ["auth"])  # ?key= is an API key


def _secret_path(dotted: str) -> bool:
    """For names in free text, where a bare `key` is most likely s3fs's access key."""
    parts = dotted.split(".")
    return any(p in SECRET_SECTIONS for p in parts) or _secret_param(parts[-1])


def redact_text(text: str) -> str:
    """`text` with URI userinfo, secret query parameters, `secret=value` pairs and bearer
    tokens masked: `https://user:pw@host/x?token=t` -> `https://***@host/x?token=***`."""
    text = _URI_USERINFO.sub(rf"\1{MASK}@", text)
    text = _QUERY_PARAM.sub(lambda m: f"{m[1]}{m[2]}={MASK}" if _secret_param(m[2]) and m[3] else m[0], text)
    text = _ASSIGNMENT.sub(lambda m: f"{m[1]}={MASK}" if _secret_path(m[1]) else m[0], text)
    text = _QUOTED_PAIR.sub(
        lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4]}{MASK}{m[4]}" if _secret_path(m[2]) and m[5] else m[0], text
    )
    return _BEARER.sub(rf"\1{MASK}", text)


def redact_argv(args: list[str]) -> list[str]:
    """Command-line arguments with secret values masked, whole: `--set
    data.storage_options={key: K}`, `--password=P`, `--api-key K`."""
    out: list[str] = []
    for arg in args:
        name, sep, _ = arg.partition("=")
        if out and out[-1].startswith("-") and "=" not in out[-1] and _secret_path(out[-1].lstrip("-")):
            out.append(MASK)
        elif sep and _secret_path(name.lstrip("-")):
            out.append(f"{name}={MASK}")
        else:
            out.append(redact_text(arg))
    return out


def _mask(value: Any) -> Any:
    """Every leaf masked but empty ones and booleans; the structure (which options were
    set) kept."""
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(v) for v in value]
    return value if value is None or value == "" or isinstance(value, bool) else MASK


def redact(value: Any) -> Any:
    """A copy of `value` (dicts, lists, strings, scalars, in any nesting) safe to log."""
    if isinstance(value, dict):
        return {
            k: _mask(v) if str(k) in SECRET_SECTIONS or is_secret_key(str(k)) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
