"""Checkpoints: a directory with config.json + model.safetensors, loaded by one function, `load_model`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from model.config import PRESETS, TokenBinderConfig, UnknownPresetError, preset_config
from model.errors import ModelError, UserError
from model.tokenbinder import TokenBinder

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_INIT_SEED = 0  # random-weight presets are seeded so every process builds the same model (same model id)


class CheckpointError(ModelError, UserError, RuntimeError):
    """A checkpoint directory is missing a file or holds something unreadable."""


def save_checkpoint(
    model: TokenBinder, directory: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> Path:
    """Write config.json and model.safetensors atomically (temp files, then rename).

    dtype (e.g. torch.float16) stores the floating-point weights in that type to halve a release's size;
    loading copies them into the fp32 model, so they come back as fp32.
    """
    import copy

    from safetensors.torch import save_model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
        f.write(cfg.to_json())
        tmp_cfg = f.name
    tmp_weights = out / (WEIGHTS_FILE + ".tmp")
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    save_model(model, str(tmp_weights))
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    os.replace(tmp_cfg, out / CONFIG_FILE)
    return out


def _read_config(path: Path) -> TokenBinderConfig:
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
        return TokenBinderConfig.from_dict(data)
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{path} has no {CONFIG_FILE}; expected a checkpoint directory with "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        ) from e
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a valid TokenBinder config: {e}") from e


def load_checkpoint(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> TokenBinder:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(directory)
    cfg = _read_config(path)
    # The architecture comes from the config; weights come from the file (never from the hub).
    build_cfg = TokenBinderConfig.from_dict({**json.loads(cfg.to_json()), "pretrained": None})
    torch.manual_seed(_INIT_SEED)
    model = TokenBinder(build_cfg)
    model.config = cfg
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}; expected the weights saved by save_checkpoint")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is corrupt or does not match {path / CONFIG_FILE}: {e}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config (preset {cfg.preset!r}): missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.model_id = f"{cfg.backbone}-{_file_digest(weights)}"
    return model.to(device).eval()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def build_model(config: TokenBinderConfig, device: str | torch.device = "cpu") -> TokenBinder:
    """A model from a config (random or open_clip-pretrained backbone; fresh indicators and focused views)."""
    torch.manual_seed(_INIT_SEED)
    model = TokenBinder(config)
    identity = config.to_json()
    if config.pretrained and Path(config.pretrained).is_file():
        st = Path(config.pretrained).stat()
        identity += f"|{st.st_size}|{int(st.st_mtime)}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    tag = f":{Path(config.pretrained).name if config.pretrained else ''}" if config.pretrained else ""
    model.model_id = f"{config.backbone}{tag}-{digest}"
    return model.to(device).eval()


def load_model(spec: str, device: str | torch.device = "cpu") -> TokenBinder:
    """Load from a checkpoint directory, a preset name ("small"), or "PRESET:PRETRAINED" ("ViT-B-32:openai").

    Every loaded model carries `model_id`: backbone + a digest of its weights (or config), used to keep
    embeddings from different models out of one index.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_checkpoint(path, device)
    name, _, pretrained = spec.partition(":")
    if name not in PRESETS:
        if path.suffix or "/" in spec:
            raise CheckpointError(
                f"{spec!r} is not a checkpoint directory (expected a folder with {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}) nor a preset ({sorted(PRESETS)})"
            )
        raise UnknownPresetError(
            f"unknown model {spec!r}; expected a checkpoint directory, one of {sorted(PRESETS)}, "
            "or PRESET:PRETRAINED such as 'ViT-B-32:openai'"
        )
    return build_model(preset_config(name, pretrained=pretrained or None), device)
