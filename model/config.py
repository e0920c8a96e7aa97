"""TokenBinder configuration: one dataclass, saved beside the weights, and the named presets."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from model.errors import ModelError, UserError

logger = logging.getLogger(__name__)

CONFIG_VERSION = 2  # 2: focus_head (version 1 configs had the slot head only)

# Architectures that open_clip does not ship. Same schema as open_clip's model_configs/*.json.
_TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# Sized so that training from scratch on a few thousand generated clips fits in minutes on a 2-core CPU:
# 64 px frames in 16 px patches (17 tokens per frame), 3-layer towers. The text tower is narrow because
# its 49,408-token embedding table dominates the size: width 96 (and 192-d embeddings) keep an fp16 release well under 20 MB.
_SMALL_CLIP = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 192, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 3},
}


class UnknownPresetError(ModelError, UserError, ValueError):
    """A model spec names no preset, no checkpoint directory and no open_clip architecture."""


@dataclass
class TokenBinderConfig:
    """Everything needed to rebuild a TokenBinder's architecture (weights live in model.safetensors)."""

    preset: str
    # Either an open_clip architecture name (loaded through open_clip) or an inline open_clip model config.
    clip_model: str | None = None
    clip_cfg: dict[str, Any] | None = None
    # Pretrained tag (e.g. "openai") or a local weights path; only used when building from a preset.
    pretrained: str | None = None
    tokenizer: str = "ViT-B-32"
    num_indicators: int = 4  # m: I_1 .. I_m
    separate_i1: bool = False  # False: I_1 is the end-of-text output (plain CLIP zero-shot ranking)
    num_frames: int = 12  # T
    top_k: int = 10  # k candidates re-scored together by the focused view
    focus_layers: int = 1
    focus_heads: int = 8
    # "candidate": one head shared by all candidates, fed by each one's own evidence (permutation-equivariant,
    # no prior over broad ranks); "slot": the first design, k per-slot outputs and a slot embedding (ours).
    focus_head: str = "candidate"
    gumbel_tau: float = 1.0
    init_logit_scale: float = 2.659260036932778  # log(1 / 0.07), CLIP's
    version: int = CONFIG_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.clip_model is None) == (self.clip_cfg is None):
            raise ValueError("TokenBinderConfig needs exactly one of clip_model or clip_cfg")
        if self.num_indicators < 2:
            raise ValueError(
                f"num_indicators must be >= 2 (I_1 plus at least one focus query), got {self.num_indicators}"
            )
        if self.focus_head not in ("candidate", "slot"):
            raise ValueError(f"focus_head must be 'candidate' or 'slot', got {self.focus_head!r}")
        if self.top_k < 1 or self.num_frames < 1:
            raise ValueError("top_k and num_frames must be positive")

    @property
    def open_clip_cfg(self) -> dict[str, Any]:
        if self.clip_cfg is not None:
            return self.clip_cfg
        import open_clip

        cfg = open_clip.get_model_config(self.clip_model)
        if cfg is None:
            raise UnknownPresetError(f"open_clip has no architecture named {self.clip_model!r}")
        return cfg

    @property
    def embed_dim(self) -> int:
        return int(self.open_clip_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.open_clip_cfg["vision_cfg"]["image_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def context_length(self) -> int:
        return int(self.open_clip_cfg["text_cfg"].get("context_length", 77))

    @property
    def num_appended(self) -> int:
        """Indicator tokens appended after end-of-text (I_1 reuses the end-of-text output unless separate)."""
        return self.num_indicators if self.separate_i1 else self.num_indicators - 1

    @property
    def backbone(self) -> str:
        return self.clip_model or self.preset

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenBinderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; expected a subset of {sorted(known)}")
        if data.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise ValueError(
                f"config version {data['version']} is newer than this code understands ({CONFIG_VERSION}); "
                "upgrade the package"
            )
        if data.get("version", CONFIG_VERSION) < 2 and "focus_head" not in data:
            data = {**data, "focus_head": "slot"}  # saved before the candidate head existed
        return cls(**data)


PRESETS: dict[str, TokenBinderConfig] = {
    "tiny": TokenBinderConfig(preset="tiny", clip_cfg=_TINY_CLIP, num_frames=4, top_k=4, focus_heads=2),
    "small": TokenBinderConfig(preset="small", clip_cfg=_SMALL_CLIP, focus_heads=4),
    "ViT-B-32": TokenBinderConfig(preset="ViT-B-32", clip_model="ViT-B-32"),
    "ViT-B-16": TokenBinderConfig(preset="ViT-B-16", clip_model="ViT-B-16"),
}


def preset_config(name: str, pretrained: str | None = None, **overrides: Any) -> TokenBinderConfig:
    """A fresh copy of a named preset, optionally with a pretrained tag/path and field overrides."""
    if name not in PRESETS:
        raise UnknownPresetError(
            f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}, "
            "'PRESET:PRETRAINED' (e.g. 'ViT-B-32:openai' or 'ViT-B-32:/path/to/weights.bin'), "
            "or a checkpoint directory holding config.json and model.safetensors"
        )
    cfg = dataclasses.replace(PRESETS[name], pretrained=pretrained, **overrides)
    if pretrained and cfg.clip_cfg is not None:
        raise UnknownPresetError(
            f"preset {name!r} is trained by this project and has no open_clip pretrained weights; "
            "use ViT-B-32 or ViT-B-16 with a pretrained tag, or a checkpoint directory"
        )
    return cfg
