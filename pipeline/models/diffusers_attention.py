"""Attention processors that route every attention of a diffusers model through our backend dispatch.

``install_attention(model, backend)`` puts one :class:`DispatchAttnProcessor` on every
``diffusers.models.attention_processor.Attention`` of a ``UNet2DConditionModel`` (CrossAttn and IF-style
SimpleCrossAttn blocks), ``PixArtTransformer2DModel`` (self- and cross-attention of every block),
``PriorTransformer``, ``AutoencoderKL`` or ``VQModel``. The processor reproduces
diffusers' ``AttnProcessor2_0`` (or ``AttnAddedKVProcessor2_0`` for added-KV attention) step by step and
calls :func:`pipeline.models.attention.attend` for the attention itself. It holds no parameters, so the
state dict (and every checkpoint) is the same whichever backend runs.

Masks. diffusers hands processors an *additive float bias*, not a bool mask:

- ``UNet2DConditionModel`` / ``Transformer2DModel`` turn a (B, L) keep-mask into ``(1 - mask) * -10000.0``
  unsqueezed to (B, 1, L): ``-0.0`` for keep, ``-10000.0`` for drop;
- ``PriorTransformer`` passes (B*heads, L, L): the text padding bias (-10000, right-padded with zeros for its
  4 extra tokens) plus a causal bias (-10000 above the diagonal), so values are 0, -10000, -20000.

Our kernels take a (B, Lk) bool key padding mask plus a ``causal`` flag, so each mask is turned back into
that form and checked to be *exactly* of that form: every float entry must be 0 (attend) or <= -1000 / -inf
(drop), every head and every query row must agree (or follow the causal pattern). Anything else raises
ValueError rather than falling back to SDPA with the full bias: a silent fallback would run a different
kernel than the config names (memory and speed cliffs at real sizes, a different rule for rows with no
visible key), and the only producers of masks in the supported models always give the decomposable pattern,
so another pattern means a code path nobody has checked.

Known differences from diffusers' own processors, both deliberate:

- a query row whose keys are all masked returns zeros (our dispatch's rule); diffusers' -10000 bias instead
  gives a uniform average over *all* keys, padding included (the bias is equal everywhere in that row);
- added-KV attention pads the text mask with "attend" for the image keys by construction; diffusers gets
  there only because ``prepare_attention_mask`` pads by the *target length* (image tokens), which fails when
  the text is as long as the image or with ``only_cross_attention=True`` (size mismatch, e.g. 7 vs 71).

The attention scale is ``attn.scale`` (``dim_head ** -0.5``, or 1.0 with ``scale_qk=False``), which equals
what diffusers' default processor for that module uses. ``upcast_attention``/``upcast_softmax`` are ignored,
as ``AttnProcessor2_0`` ignores them.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from pipeline.models.attention import attend, check_backend

# A float mask entry at or below this is "drop" (diffusers uses -10000.0, -9984 once rounded to bf16; -inf and
# finfo.min are common elsewhere): exp(-1000 + O(score)) is exactly 0 in fp32, fp16 and bf16.
DROP_AT_OR_BELOW = -1000.0

MaskInfo = tuple[Optional[torch.Tensor], bool]  # (key padding mask (B, Lk) bool or None, causal)


def _mask_error(mask: torch.Tensor, why: str) -> ValueError:
    return ValueError(
        f"DispatchAttnProcessor: attention mask {mask.dtype} {tuple(mask.shape)} {why}. The attention kernels "
        "take only a key padding mask (bool, True = attend; or an additive bias with 0 = attend and -10000 "
        "or -inf = drop) plus causal masking; use diffusers' AttnProcessor2_0 for other masks.")


def _as_keep_4d(mask: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Any mask layout diffusers produces -> bool "may attend" (B, 1|heads, 1|Lq, Lm).

    Accepts (B|1, Lm), (B|1|B*heads, 1|Lq, Lm) and (B|1, 1|heads, 1|Lq, Lm); bool masks (True = attend) or
    additive float biases (0 = attend, <= DROP_AT_OR_BELOW = drop). Syncs with the device (value check).
    """
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        if mask.shape[0] == batch * heads and heads > 1:
            mask = mask.reshape(batch, heads, *mask.shape[1:])  # already repeated per head (prior, some paths)
        else:
            mask = mask[:, None]
    elif mask.dim() != 4:
        raise _mask_error(mask, "must be 2-D, 3-D or 4-D")
    if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
        raise _mask_error(mask, f"does not fit batch {batch} x {heads} heads")
    mask = mask.expand(batch, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise _mask_error(mask, "must be bool or floating point")
    keep = mask == 0
    if not (keep | (mask <= DROP_AT_OR_BELOW)).all():
        raise _mask_error(mask, f"has values other than 0 and <= {DROP_AT_OR_BELOW} (an additive bias, not a "
                                "padding mask; a 0/1 float keep-mask must be passed as bool)")
    return keep


def decompose_mask(mask: torch.Tensor, batch: int, heads: int, lq: int, allow_causal: bool) -> MaskInfo:
    """Split a diffusers attention mask into (key padding mask (B, Lm) bool or None, causal), exactly.

    mask: see :func:`_as_keep_4d`; lq: the number of queries. Causal means query i attends keys 0..i and
    needs a square (Lq == Lm) mask. Raises ValueError when the mask is not exactly "padding [& causal]".
    The padding mask is None when nothing is padded (so the backends take their unmasked fast paths).
    """
    keep = _as_keep_4d(mask, batch, heads)
    if keep.shape[1] > 1 and not (keep == keep[:, :1]).all():
        raise _mask_error(mask, "differs between heads")
    keep = keep[:, 0]  # (B, 1|Lq, Lm)
    rows, lm = keep.shape[1], keep.shape[2]
    if rows not in (1, lq):
        raise _mask_error(mask, f"has {rows} query rows for {lq} queries")
    causal = False
    if rows > 1 and not (keep == keep[:, :1]).all():
        tril = torch.ones(rows, lm, dtype=torch.bool, device=keep.device).tril()
        # The last query row of "padding & causal" sees every key, so it *is* the padding mask.
        padding = keep[:, -1]
        if not (allow_causal and rows == lm and torch.equal(keep, padding[:, None, :] & tril)):
            raise _mask_error(mask, "is neither the same for every query nor key padding & causal"
                              + ("" if allow_causal else " (causal is not possible here)"))
        causal = True
    else:
        padding = keep[:, 0]
    return (None if padding.all() else padding.contiguous()), causal


def trusted_layout(mask: torch.Tensor, batch: int, heads: int, lq: int, allow_causal: bool) -> Optional[MaskInfo]:
    """The two mask layouts our models produce, decomposed without reading values, or None for any other layout.

    UNet2DConditionModel's text bias (B, 1, Lk) and PriorTransformer's causal + padding bias (B*heads, L, L) (its
    last query row sees every unpadded key). Used on CUDA, where :func:`decompose_mask`'s exact checks would cost a
    host-device synchronisation per forward, and under torch.compile, where they would break the graph; on CPU in
    eager mode (and in the tests) every mask is checked exactly.
    """
    if not mask.is_floating_point() or mask.dim() != 3:
        return None
    threshold = DROP_AT_OR_BELOW / 2
    if mask.shape[:2] == (batch, 1):
        return (mask[:, 0] > threshold).contiguous(), False
    if allow_causal and heads > 1 and mask.shape == (batch * heads, lq, lq):
        return (mask.view(batch, heads, lq, lq)[:, 0, -1] > threshold).contiguous(), True
    return None


class _MaskCache:
    """Remembers :func:`decompose_mask` per mask tensor, so the host syncs once per forward, not per layer.

    A model hands the same mask tensor to every layer; an entry is valid while that exact tensor is alive and
    unmodified (identity through a weak reference, in-place edits through its version counter). Inference-mode
    tensors have no version counter and are not cached.
    """

    def __init__(self, max_entries: int = 32) -> None:
        self._entries: dict[tuple, tuple[weakref.ref, MaskInfo]] = {}
        self._max_entries = max_entries

    def get(self, mask: torch.Tensor, key: tuple, compute: Callable[[], MaskInfo]) -> MaskInfo:
        if mask.is_inference():
            return compute()
        full_key = (id(mask), mask._version, *key)
        hit = self._entries.get(full_key)
        if hit is not None and hit[0]() is mask:
            return hit[1]
        result = compute()
        self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[full_key] = (weakref.ref(mask), result)
        return result


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads * D) -> (B, heads, L, D)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


class DispatchAttnProcessor:
    """A diffusers attention processor computing ``AttnProcessor2_0`` (or ``AttnAddedKVProcessor2_0`` when
    ``attn.added_kv_proj_dim`` is set) with the attention itself run by ``attend(..., backend=backend)``.

    A plain object, not an ``nn.Module``: nothing of it enters the state dict. One instance may serve every
    layer of a model (that is what :func:`install_attention` does, so the mask cache is shared).
    """

    def __init__(self, backend: str) -> None:
        self.backend = check_backend(backend)
        self._masks = _MaskCache()

    def __repr__(self) -> str:
        return f"DispatchAttnProcessor(backend={self.backend!r})"

    def _mask_info(self, mask: Optional[torch.Tensor], batch: int, heads: int, lq: int,
                   allow_causal: bool) -> MaskInfo:
        if mask is None:
            return None, False
        compiling = torch.compiler.is_compiling()
        if mask.is_cuda or compiling:
            trusted = trusted_layout(mask, batch, heads, lq, allow_causal)
            if trusted is not None:
                return trusted
        if compiling:  # the cache's key is the mask's id(): a guard on it would recompile the graph every step
            return decompose_mask(mask, batch, heads, lq, allow_causal)
        rows = mask.shape[-2] if mask.dim() > 2 else 1  # a one-row mask fits every lq: one entry for all
        return self._masks.get(mask, (batch, heads, lq if rows > 1 else None, allow_causal),
                               lambda: decompose_mask(mask, batch, heads, lq, allow_causal))

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states: (B, L, C) or (B, C, H, W); encoder_hidden_states: (B, Lt, C_text) or None;
        attention_mask: any layout :func:`decompose_mask` accepts; temb: (B, C_t) for spatial_norm.
        Returns hidden_states' shape."""
        if attn.added_kv_proj_dim is not None:
            return self._added_kv(attn, hidden_states, encoder_hidden_states, attention_mask)
        return self._standard(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _standard(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                  attention_mask: Optional[torch.Tensor], temb: Optional[torch.Tensor]) -> torch.Tensor:
        """``AttnProcessor2_0``, line for line, with ``attend`` in place of SDPA."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = _split_heads(query, attn.heads)
        key = _split_heads(attn.to_k(encoder_hidden_states), attn.heads)
        value = _split_heads(attn.to_v(encoder_hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
            raise _mask_error(attention_mask, f"covers {attention_mask.shape[-1]} keys; the attention has "
                              f"{key.shape[2]}")
        padding, causal = self._mask_info(attention_mask, batch, attn.heads, query.shape[2], allow_causal=True)
        out = attend(query, key, value, padding, causal, self.backend, attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _added_kv(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                  attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``AttnAddedKVProcessor2_0``: keys are [text (add_k_proj) ; image (to_k)], or text only with
        ``only_cross_attention``; a text-length mask is extended with "attend" over the image keys."""
        residual = hidden_states
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        batch, image_len, _ = hidden_states.shape
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        key = _split_heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
        value = _split_heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
        text_len = key.shape[2]
        if not attn.only_cross_attention:
            key = torch.cat([key, _split_heads(attn.to_k(hidden_states), attn.heads)], dim=2)
            value = torch.cat([value, _split_heads(attn.to_v(hidden_states), attn.heads)], dim=2)
        if attention_mask is not None and attention_mask.shape[-1] not in (text_len, key.shape[2]):
            raise _mask_error(attention_mask, f"covers {attention_mask.shape[-1]} keys; expected the {text_len} "
                              f"text keys or all {key.shape[2]} keys")
        padding, _ = self._mask_info(attention_mask, batch, attn.heads, image_len, allow_causal=False)
        if padding is not None and padding.shape[1] < key.shape[2]:  # text-only mask: the image keys all attend
            padding = torch.cat([padding, padding.new_ones(batch, key.shape[2] - text_len)], dim=1)
        out = attend(query, key, value, padding, False, self.backend, attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, residual.shape[1])
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        return out.transpose(-1, -2).reshape(residual.shape) + residual


def _unsupported_reason(attn: Attention) -> Optional[str]:
    """Why :class:`DispatchAttnProcessor` cannot stand in for this module's processor, or None."""
    if getattr(attn, "context_pre_only", None) is not None or getattr(attn, "add_q_proj", None) is not None:
        return "joint (MM-DiT style) attention is not supported"
    if attn.to_out is None:
        return "attention without an output projection (pre_only) is not supported"
    if attn.inner_kv_dim != attn.inner_dim:
        return "grouped/multi-query attention (kv_heads != heads) is not supported"
    processor = attn.get_processor()
    if isinstance(processor, nn.Module) and any(True for _ in processor.parameters()):
        return (f"its processor {type(processor).__name__} holds trained weights (LoRA, IP-adapter, custom "
                "diffusion) that replacing it would drop")
    return None


def install_attention(model: nn.Module, backend: str) -> int:
    """Route every attention of a diffusers ``model`` through ``attend(..., backend=backend)``.

    Sets one shared :class:`DispatchAttnProcessor` on every ``Attention`` module and returns how many. Checks
    everything before changing anything: an unknown backend, an attention-like module of another class, or an
    ``Attention`` this processor cannot reproduce raises ValueError and leaves the model as it was. Afterwards,
    raises RuntimeError if any attention module still has another processor.
    """
    processor = DispatchAttnProcessor(backend)
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            reason = _unsupported_reason(module)
            if reason is not None:
                raise ValueError(f"install_attention: {type(model).__name__}.{name}: {reason}")
            targets.append(module)
        elif hasattr(module, "set_processor"):
            raise ValueError(f"install_attention: {type(model).__name__}.{name} is a {type(module).__name__}, an "
                             "attention module this processor does not know; only "
                             "diffusers.models.attention_processor.Attention is supported")
    for module in targets:
        module.set_processor(processor)
    left = [name for name, module in model.named_modules()
            if hasattr(module, "get_processor") and module.get_processor() is not processor]
    if left:
        raise RuntimeError(f"install_attention: attention modules still on another processor: {', '.join(left)}")
    return len(targets)
