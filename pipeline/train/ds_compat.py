"""Workarounds for DeepSpeed defects the Trainer depends on, each scoped as narrowly as possible.

Scalar (0-dim) parameters, e.g. CLIP's ``logit_scale``: DeepSpeed (0.19.8) broadcasts initial weights as
``param.data.view(torch.uint8)``, which torch refuses for 0-dim tensors of wider dtypes ("self.dim() cannot be 0
to view Float as Byte"), in two places: ``DeepSpeedEngine._broadcast_model`` (every ZeRO stage) and ZeRO-3's
``Init._zero_init_param`` (partitioning a model built without ``zero.Init``). While ``deepspeed.initialize`` runs,
:func:`scalar_parameters_supported` presents 0-dim parameters to those two broadcasts as 1-element views of the same
storage, and gives a partitioned scalar back its true shape (``ds_shape == ()``), so gathering, checkpoints
(``param_shapes``) and zero_to_fp32 all keep the module's own shape. Nothing else is touched, and nothing
stays patched after ``deepspeed.initialize`` returns.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def _scalars_as_vectors(params: Iterable[nn.Parameter]) -> Iterator[None]:
    scalars = [(p, p.data) for p in params if p.dim() == 0]
    for p, data in scalars:
        p.data = data.reshape(1)  # a view: values broadcast into it land in the parameter's storage
    try:
        yield
    finally:
        for p, data in scalars:
            p.data = data


@contextmanager
def scalar_parameters_supported() -> Iterator[None]:
    """Patch the two broadcasts for the duration of one ``deepspeed.initialize`` call (see module docstring)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    original_broadcast = DeepSpeedEngine._broadcast_model
    original_zero_init = Init._zero_init_param

    def broadcast_model(self: Any) -> None:
        with _scalars_as_vectors(self.module.parameters()):
            original_broadcast(self)

    def zero_init_param(self: Any, param: nn.Parameter) -> None:
        if param.dim() != 0:
            original_zero_init(self, param)
            return
        param.data = param.data.reshape(1)
        original_zero_init(self, param)
        param.ds_shape = torch.Size([])  # the partition holds 1 value either way; gathers reshape to ()

    DeepSpeedEngine._broadcast_model = broadcast_model
    Init._zero_init_param = zero_init_param
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original_broadcast
        Init._zero_init_param = original_zero_init
