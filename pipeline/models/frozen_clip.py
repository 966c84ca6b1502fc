"""A frozen open_clip model loaded from a folder, giving what the diffusion prior conditions on and predicts.

The folder is an open_clip ``local-dir:`` folder (``open_clip_config.json`` + weights): what ``ClipStage.export``
writes, or any open_clip model downloaded to disk in that layout (e.g. a ``hf-hub:`` snapshot). open_clip itself
builds the model from it, so every number here is open_clip's own computation:

- :meth:`FrozenClip.encode_text`: per-token encodings (B, L, W) = the text tower's output after ``ln_final`` (the
  sequence open_clip pools from), the padding mask (B, L) and the pooled embedding (B, E) = ``encode_text(ids,
  normalize=True)``;
- :meth:`FrozenClip.encode_image`: (B, E) = ``encode_image(images, normalize=True)``;
- :meth:`FrozenClip.project_tokens`: (B, L, W) -> (B, L, E) through the text projection open_clip applies to the
  pooled token, so the EOT token's projected encoding is the (unnormalised) text embedding.

Padding. open_clip's text towers are causal and pool at the EOT token (``pool_type`` 'argmax': EOT has the highest
id; 'eos': the first ``eos_id``). Token i only sees tokens 0..i, so the encodings up to the EOT do not depend on
what follows, and the positions after it are padding: ``mask = position <= EOT position``. Other pooling types
(non-causal towers, CoCa, HF text towers) have no such structure and are refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults when preprocess_cfg gives none
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
POOL_TYPES = ("argmax", "eos")


@dataclass(frozen=True)
class ClipInfo:
    """What the rest of the pipeline needs to know about a CLIP folder, read from its config alone (no weights).

    embed_dim: E; token_width: W (text tower width); context_length: L; image_size: side in pixels; mean/std: the
    image normalisation of its preprocessing.
    """

    path: str
    embed_dim: int
    token_width: int
    context_length: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _square(size: Any, path: str) -> int:
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ConfigError(f"{path}: non-square CLIP image size {size} is not supported")
        size = size[0]
    return int(size)


def read_clip_info(path: str | Path, key: str = "model.clip") -> ClipInfo:
    """Sizes and preprocessing of the CLIP folder `path`; ConfigError naming `key` when it is not one."""
    folder = Path(path)
    config_path = folder / OPEN_CLIP_CONFIG
    if not folder.exists():
        raise ConfigError(f"{key}: {path} does not exist (no such file or directory); fix the path")
    if not config_path.is_file():
        raise ConfigError(f"{key}: {path} has no {OPEN_CLIP_CONFIG}; it must be an open_clip folder, e.g. the "
                          "'clip' component of `python -m pipeline export` of a clip run")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg, pre = config["model_cfg"], config.get("preprocess_cfg", {})
        text = model_cfg["text_cfg"]
        return ClipInfo(path=str(path), embed_dim=int(model_cfg["embed_dim"]), token_width=int(text.get("width", 512)),
                        context_length=int(text.get("context_length", 77)),
                        image_size=_square(model_cfg["vision_cfg"].get("image_size", 224), str(path)),
                        mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{key}: {config_path} is not a valid open_clip config ({exc!r})") from None


class TextEncoding(NamedTuple):
    """tokens: (B, L, W) per-token encodings; mask: (B, L) bool, True = real token (up to and including EOT);
    pooled: (B, E) L2-normalised text embedding."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class FolderTokenize:
    """Batched tokenizer of a CLIP folder for the data workers: list[str] -> {"text": int64 (B, L)}.

    Holds only the path and builds open_clip's tokenizer on first use, so it pickles cheaply into workers.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_tokenizer": None}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(f"local-dir:{self.path}")
        return {"text": self._tokenizer(list(captions))}


def load_open_clip(path: str | Path, key: str = "model.clip") -> nn.Module:
    """open_clip's own model for folder `path` (eval mode); ConfigError when there are no weights to load."""
    import open_clip

    read_clip_info(path, key)
    if not any(any(Path(path).glob(p)) for p in WEIGHT_PATTERNS):
        raise ConfigError(f"{key}: {path} has no CLIP weights (*.safetensors/.bin/.pt) next to {OPEN_CLIP_CONFIG}; "
                          "open_clip would silently use random weights")
    model = open_clip.create_model(f"local-dir:{path}")
    return model.eval()


class FrozenClip(nn.Module):
    """An open_clip CLIP (``open_clip.CLIP``, or ``CustomTextCLIP`` with open_clip's own text transformer), frozen.

    The Trainer moves it to the device and compute dtype like any frozen helper; it has no trainable state.
    """

    def __init__(self, model: nn.Module, info: ClipInfo) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self._custom_text = self._check_text_tower(model)
        self.pool_type = getattr(self.text_tower, "text_pool_type", getattr(self.text_tower, "pool_type", None))
        if self.pool_type not in POOL_TYPES:
            raise ConfigError(f"{info.path}: text pooling {self.pool_type!r} has no padding structure the prior can "
                              f"use; supported: {', '.join(POOL_TYPES)} (causal CLIP text towers)")
        self.eos_id = getattr(self.text_tower, "text_eos_id", getattr(self.text_tower, "eos_id", None))
        self.tokenize = FolderTokenize(info.path)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, path: str | Path, key: str = "model.clip") -> FrozenClip:
        return cls(load_open_clip(path, key), read_clip_info(path, key))

    @staticmethod
    def _check_text_tower(model: nn.Module) -> bool:
        """False for ``open_clip.CLIP`` (text modules on the model), True for ``CustomTextCLIP`` (on ``.text``)."""
        import open_clip
        from open_clip.transformer import TextTransformer

        if isinstance(model, open_clip.CLIP):
            return False
        text = getattr(model, "text", None)
        if isinstance(text, TextTransformer) and text.cls_emb is None:
            return True
        raise ConfigError(f"{type(model).__name__}: only open_clip CLIP models with open_clip's causal text "
                          "transformer are supported (not CoCa or Hugging Face text towers)")

    @property
    def text_tower(self) -> nn.Module:
        """The module holding the text tower's parts (not a registered submodule: no duplicate state)."""
        return self.model.text if self._custom_text else self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------- text
    def text_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 token ids -> (B, L) bool, True up to and including the token open_clip pools from."""
        if self.pool_type == "argmax":
            pooled_at = ids.argmax(dim=-1)
        else:
            pooled_at = (ids == self.eos_id).int().argmax(dim=-1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return positions[None, :] <= pooled_at[:, None]

    def _token_states(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, W): the text transformer's output after ln_final, exactly as encode_text runs it."""
        tower = self.text_tower
        if not self._custom_text:  # open_clip.CLIP.encode_text
            cast_dtype = tower.transformer.get_cast_dtype()
            x = tower.token_embedding(ids).to(cast_dtype)
            x = x + tower.positional_embedding.to(cast_dtype)
            x = tower.transformer(x, attn_mask=tower.attn_mask)
        else:  # open_clip.transformer.TextTransformer.forward (no cls token)
            x, attn_mask = tower._embeds(ids)
            x = tower.transformer(x, attn_mask=attn_mask)
        return tower.ln_final(x)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, W) token encodings -> (B, L, E) through the text projection (identity when the tower has none)."""
        projection = self.text_tower.text_projection
        if projection is None:
            return tokens
        return projection(tokens) if isinstance(projection, nn.Linear) else tokens @ projection

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor) -> TextEncoding:
        """(B, L) int64 ids (from :attr:`tokenize`) -> per-token encodings, padding mask, normalised embedding."""
        from open_clip.transformer import text_global_pool

        tokens = self._token_states(ids)
        pooled = text_global_pool(tokens, ids, self.pool_type, eos_token_id=self.eos_id)
        pooled = self.project_tokens(pooled)
        return TextEncoding(tokens, self.text_mask(ids), F.normalize(pooled, dim=-1))

    def encode_prompts(self, prompts: list[str]) -> TextEncoding:
        """Tokenize `prompts` with the folder's tokenizer and encode them on this module's device."""
        ids = self.tokenize(prompts)["text"].to(self.device)
        return self.encode_text(ids)

    # ------------------------------------------------------------------------------------------ image
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised with :attr:`info` mean/std -> (B, E) L2-normalised image embeddings."""
        return self.model.encode_image(images, normalize=True)
