"""Freshly quantised tokens, as a codec hands them to the store."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TierRows:
    """Freshly quantised tokens of one bit width, compacted to the front per ``(batch, head)``.

    Row ``r`` of head ``(b, h)`` is a real token when ``r < group_count[b, h].sum()``; rows are in slot
    order. Key parameters are per *group* of rows (``group_count[b, h, p]`` consecutive rows use
    ``k_scale[b, h, p]``), value parameters per row and per group of ``value_group`` channels.
    """

    k_codes: torch.Tensor  # [B, H, n, D] uint8, unpacked
    v_codes: torch.Tensor  # [B, H, n, D] uint8, unpacked
    v_scale: torch.Tensor  # [B, H, n, D // value_group]
    v_zero: torch.Tensor  # [B, H, n, D // value_group]
    k_scale: torch.Tensor  # [B, H, P, D]
    k_zero: torch.Tensor  # [B, H, P, D]
    v_chan: torch.Tensor | None  # [B, H, P, D] CSTQuant channel normalisers, or None
    group_count: torch.Tensor  # [B, H, P] int32
