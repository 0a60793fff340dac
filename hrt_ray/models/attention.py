"""Local-window multi-head self-attention with a relative position bias (HRFormer's MHSA).

The official HRFormer code runs this through a copy of an old ``nn.MultiheadAttention``:
einops rearranges to a sequence-first layout, three separate projections, ``bmm``, a bias
added in a reshaped view, softmax, ``bmm`` again and several ``contiguous()`` copies. Here the
tokens stay channels-last ``(B, H, W, C)`` end to end: one reshape/permute gathers the
windows, one fused ``q/k/v`` projection (the three official weights concatenated, so the
state_dict keeps the official names), and ``F.scaled_dot_product_attention`` with the bias
as an additive mask. The arithmetic is the same as the official one (scale ``head_dim**-0.5``,
bias added before the softmax, zero-padded windows attended to without masking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_index(window_size: int) -> torch.Tensor:
    """``(ws*ws, ws*ws)`` index into a ``((2ws-1)**2, heads)`` bias table, in the official order."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)  # 2, ws*ws
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def _pad_amounts(size: int, window_size: int) -> tuple[int, int]:
    """(before, after) zero padding centring ``size`` in a multiple of ``window_size`` (official rule)."""
    total = -size % window_size
    return total // 2, total - total // 2


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W multiples of ``window_size`` -> ``(B*nWh*nWw, ws*ws, C)``."""
    b, h, w, c = x.shape
    ws = window_size
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_merge(
    windows: torch.Tensor, window_size: int, batch: int, height: int, width: int
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, ws*ws, C)`` -> ``(B, H, W, C)``."""
    ws = window_size
    c = windows.shape[-1]
    x = windows.reshape(batch, height // ws, width // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, c)


class WindowMultiheadAttention(nn.Module):
    """Multi-head attention inside windows of ``window_size**2`` tokens, with relative position bias.

    Parameter and buffer names (and their registration order) are the official ``MHA_``'s, so
    official checkpoints load strictly: ``relative_position_bias_table``,
    ``relative_position_index``, ``k_proj``, ``v_proj``, ``q_proj``, ``out_proj``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if window_size < 1:
            raise ValueError(f"window_size must be a positive integer, got {window_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """``(heads, N, N)`` additive bias, N = ws*ws."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """``(num_windows, N, C)`` -> ``(num_windows, N, C)``."""
        bw, n, c = windows.shape
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(windows, weight, bias).view(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (bw, heads, n, head_dim)
        mask = self.relative_position_bias().unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"


class LocalWindowAttention(nn.Module):
    """Attention over non-overlapping windows of a ``(B, H, W, C)`` map of any size.

    Sizes that are not multiples of the window are zero-padded symmetrically (extra row/column
    at the end) and cropped back afterwards, exactly as the official ``PadBlock`` does; padded
    tokens take part in the attention as keys, as they do in the official model.
    The module is named ``attn`` inside a block and holds the MHSA as ``attn`` too, which gives the
    official key path ``...attn.attn.q_proj.weight``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowMultiheadAttention(dim, num_heads, window_size, attn_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        ws = self.window_size
        top, bottom = _pad_amounts(h, ws)
        left, right = _pad_amounts(w, ws)
        padded = bool(top or bottom or left or right)
        if padded:
            x = F.pad(x, (0, 0, left, right, top, bottom))
        hp, wp = h + top + bottom, w + left + right
        out = window_merge(self.attn(window_partition(x, ws)), ws, b, hp, wp)
        if padded:
            out = out[:, top : top + h, left : left + w, :]
        return out
