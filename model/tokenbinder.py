"""TokenBinder on open_clip: query indicators inside the text transformer, frame tokens, two focused views."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import TokenBinderConfig
from model.focused import FocusedView
from model.losses import tokenbinder_losses
from model.outputs import FocusOutput, TextOutput, VideoOutput

logger = logging.getLogger(__name__)

# open_clip's OpenAI normalisation constants (every preset here uses them).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(config: TokenBinderConfig) -> nn.Module:
    """The open_clip CLIP backbone: open_clip's own factory for named architectures (and pretrained weights)."""
    import open_clip

    if config.clip_model is not None:
        return open_clip.create_model(config.clip_model, pretrained=config.pretrained or None)
    return open_clip.model.CLIP(**config.clip_cfg)  # type: ignore[arg-type]


class TokenBinder(nn.Module):
    model_id: str = ""  # set by model.checkpoint when loaded: backbone + weights digest

    def __init__(self, config: TokenBinderConfig, clip: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        # Any: open_clip's CLIP attributes (token_embedding, transformer, ...) are not typed through nn.Module.
        backbone: Any = clip if clip is not None else build_clip(config)
        self.clip = backbone
        if getattr(self.clip, "text_pool_type", "argmax") != "argmax":
            raise ValueError(
                "TokenBinder needs an open_clip CLIP whose text tower pools at the end-of-text token"
            )
        width = backbone.token_embedding.weight.shape[1]
        dim = config.embed_dim
        n_ind = config.num_indicators - 1
        self.indicators = nn.Parameter(torch.randn(config.num_appended, width) * 0.02)
        self.focus_t2v = FocusedView(
            dim, n_ind, config.top_k, config.num_frames, config.focus_layers, config.focus_heads,
            config.focus_head,
        )  # fmt: skip
        self.focus_v2t = FocusedView(
            dim, config.num_frames, config.top_k, n_ind, config.focus_layers, config.focus_heads,
            config.focus_head,
        )  # fmt: skip
        self._tokenizer: Callable[..., torch.Tensor] | None = None
        # Set by the training loop when distributed: gathers a local batch tensor from every process.
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ---- text ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Callable[..., torch.Tensor]:
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.config.tokenizer)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, C]; captions are truncated so that caption + appended indicators fit the context."""
        return self.tokenizer(
            list(texts), context_length=self.config.context_length - self.config.num_appended
        )

    def encode_text(self, ids: torch.Tensor, truncate: bool = True) -> TextOutput:
        """Run the text transformer with indicators appended after each caption's end-of-text token.

        With truncate=True the transformer runs only up to the longest caption in the batch plus the
        indicators; the causal mask makes the positions after that irrelevant to every output we read.
        """
        clip = self.clip
        n = self.config.num_appended
        eot = ids.argmax(dim=-1)  # [B]
        length = int(eot.max()) + 1 if truncate else ids.shape[1]
        length = min(length + n, self.config.context_length)
        B = ids.shape[0]
        cast = clip.transformer.get_cast_dtype()
        tok = ids[:, : min(length, ids.shape[1])]
        x = clip.token_embedding(tok).to(cast)  # [B, L', W]
        if x.shape[1] < length:
            x = torch.cat([x, x.new_zeros(B, length - x.shape[1], x.shape[2])], dim=1)
        positions = eot[:, None] + 1 + torch.arange(n, device=ids.device)[None]  # [B, n]
        if int(positions.max()) >= length:
            raise ValueError("captions must be tokenized with TokenBinder.tokenize so the indicators fit")
        src = self.indicators.to(cast)[None].expand(B, n, x.shape[2])
        x = x.scatter(1, positions[..., None].expand(B, n, x.shape[2]), src)
        x = x + clip.positional_embedding[:length].to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)  # [B, L, W]
        rows = torch.arange(B, device=ids.device)
        if self.config.separate_i1:
            i1 = x[rows, positions[:, 0]]
            rest = x[rows[:, None], positions[:, 1:]]
        else:
            i1 = x[rows, eot]
            rest = x[rows[:, None], positions]
        out = self._project_text(torch.cat([i1[:, None], rest], dim=1))  # [B, m, D]
        out = F.normalize(out.float(), dim=-1)
        return TextOutput(i1=out[:, 0], indicators=out[:, 1:])

    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.clip.text_projection
        if proj is None:
            return x
        if isinstance(proj, nn.Linear):
            return proj(x)
        return x @ proj

    def encode_queries(self, texts: Sequence[str]) -> TextOutput:
        return self.encode_text(self.tokenize(texts).to(self.device))

    # ---- video ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.indicators.device

    @property
    def dtype(self) -> torch.dtype:
        return self.indicators.dtype

    def preprocess_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames [..., H, W, 3] -> normalised float [..., 3, S, S] at the model's image size."""
        t = torch.as_tensor(frames)
        lead = t.shape[:-3]
        t = t.reshape(-1, *t.shape[-3:]).permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, H, W]
        size = self.config.image_size
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_STD).view(1, 3, 1, 1)
        t = (t - mean) / std
        return t.reshape(*lead, 3, size, size)

    def encode_frames(self, frames: torch.Tensor) -> VideoOutput:
        """Preprocessed frames [N, T, 3, S, S] -> frame tokens [N, T, D] and CLS [N, D]."""
        N, T = frames.shape[:2]
        emb = self.clip.encode_image(frames.reshape(N * T, *frames.shape[2:]).to(self.device, self.dtype))
        tokens = F.normalize(emb.float(), dim=-1).view(N, T, -1)  # [N, T, D]
        cls = F.normalize(tokens.mean(dim=1), dim=-1)
        return VideoOutput(frame_tokens=tokens, cls=cls)

    # ---- focused views -------------------------------------------------------------------------------------
    def rescore_videos(
        self,
        indicators: torch.Tensor,  # [B, m-1, D]
        candidate_tokens: torch.Tensor,  # [B, k, T, D] in broad-view order
        slot_mask: torch.Tensor | None = None,
    ) -> FocusOutput:
        tau = self.config.gumbel_tau if self.training else None
        return self.focus_t2v(indicators, candidate_tokens, slot_mask, gumbel_tau=tau)

    def rescore_texts(
        self,
        frame_tokens: torch.Tensor,  # [B, T, D]
        candidate_indicators: torch.Tensor,  # [B, k, m-1, D] in broad-view order
        slot_mask: torch.Tensor | None = None,
    ) -> FocusOutput:
        tau = self.config.gumbel_tau if self.training else None
        return self.focus_v2t(frame_tokens, candidate_indicators, slot_mask, gumbel_tau=tau)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100.0)

    # ---- training ------------------------------------------------------------------------------------------
    def forward(
        self, ids: torch.Tensor, frames: torch.Tensor, ground_weight: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """Training step for a batch of (caption, video) pairs: returns the named losses (see model.losses)."""
        text = self.encode_text(ids)
        video = self.encode_frames(frames)
        if self.gather is not None:
            text = TextOutput(self.gather(text.i1), self.gather(text.indicators))
            video = VideoOutput(self.gather(video.frame_tokens), self.gather(video.cls))
        return tokenbinder_losses(
            self, text, video, scale=self.logit_scale, top_k=self.config.top_k, ground_weight=ground_weight
        )
