"""Multi-head attention: dense, dynamic block-sparse (DeepSeek NSA-style selection) and temporal decay.

One module, ``Attention(AttentionConfig)``; the kinds are configurations of it:

* ``kind="dense"``            ``F.scaled_dot_product_attention`` (a float mask only where a bias is needed).
* ``kind="sparse"``           keys / values are split into blocks of ``block_size``. Every query block scores
  all key blocks cheaply (mean-pooled queries . mean-pooled keys, ``[n_blocks x n_blocks]``), keeps its
  ``local_blocks`` sliding-window blocks plus the ``top_k_blocks`` best other blocks, gathers those blocks
  (``[B, H, n_qblocks, n_sel * block_size, d]``) and runs an exact softmax over the gathered keys plus
  ``n_global_tokens`` global keys (the first tokens, seen by every query). Query blocks are processed in
  chunks, so time and memory are ``O(n * n_sel * block_size)``; no ``n x n`` tensor is ever built. When
  the selection covers every block it is exactly dense attention.
* ``kind="temporal_decay"``   dense attention plus a learnable per-head bias ``-lambda_h * |t_q - t_k|`` from
  float ``timestamps [B, N]`` (irregular sampling allowed; default: token positions), ``lambda_h =
  softplus(raw_h) >= 0``. ``time_decay=True`` adds the same bias to ``kind="sparse"``, which gives the
  hybrid "local window + routed global blocks + global tokens + decay" attention.

``key_padding_mask [B, N]`` (True = padding, ignored as key) works for every kind. A query that can see no
key at all (e.g. an all-padding sequence) gets a zero output, as in ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionKind = Literal["dense", "sparse", "temporal_decay"]
CHUNK_SCORES = 1 << 23  # default score elements per query chunk in the sparse path (32 MiB in fp32)


@dataclass
class AttentionConfig:
    """Arguments of one attention layer."""

    dim: int = 256
    n_heads: int = 4
    kind: AttentionKind = "dense"
    causal: bool = False
    block_size: int = 64
    top_k_blocks: int = 16
    local_blocks: int = 1  # sliding window, in blocks (own block first, then neighbours)
    n_global_tokens: int = 0
    dropout: float = 0.0
    time_decay: bool = False  # decay bias in kind="sparse" (always on for kind="temporal_decay")
    decay_init: float = 0.1  # initial lambda_h (0 -> effectively no decay)
    qkv_bias: bool = False
    q_chunk_blocks: int = 0  # query blocks per chunk in the sparse path; 0 = auto (~8M scores per chunk)

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "sparse", "temporal_decay"):
            raise ValueError(f"kind must be 'dense', 'sparse' or 'temporal_decay', got {self.kind!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.block_size < 1 or self.top_k_blocks < 0 or self.local_blocks < 0:
            raise ValueError("block_size must be >= 1, top_k_blocks and local_blocks >= 0")
        if self.kind == "sparse" and self.top_k_blocks + self.local_blocks < 1:
            raise ValueError("sparse attention needs top_k_blocks + local_blocks >= 1")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def uses_decay(self) -> bool:
        return self.kind == "temporal_decay" or self.time_decay


def _inverse_softplus(value: float) -> float:
    if value <= 0:
        return -30.0  # softplus(-30) ~ 1e-13: no decay in practice
    return value + math.log(-math.expm1(-value))


def decay_bias(rates: torch.Tensor, t_q: torch.Tensor, t_k: torch.Tensor) -> torch.Tensor:
    """``-rates[h] * |t_q - t_k|`` for t_q ``[B, Nq]``, t_k ``[B, Nk]`` -> ``[B, H, Nq, Nk]``."""
    dt = (t_q.unsqueeze(-1) - t_k.unsqueeze(-2)).abs().unsqueeze(1)
    return -rates.view(1, -1, 1, 1) * dt


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention through ``F.scaled_dot_product_attention``; q/k/v ``[B, H, N, d]``.

    ``bias``: additive float bias broadcastable to ``[B, H, N, N]``; ``key_padding_mask``: ``[B, N]``, True
    = padding.
    """
    if bias is None and key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    n_q, n_k = q.size(-2), k.size(-2)
    keep: torch.Tensor | None = None
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
    if causal:
        tril = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        keep = tril if keep is None else keep & tril
    if bias is None:
        mask: torch.Tensor | None = keep
    else:
        mask = bias.to(q.dtype)
        if keep is not None:
            mask = mask.masked_fill(~keep, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _local_offsets(local_blocks: int, causal: bool) -> list[int]:
    if causal:
        return [-i for i in range(local_blocks)]
    offsets = [0]
    for i in range(1, local_blocks):
        offsets += [-i, i]
    return offsets[:local_blocks]


def select_blocks(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    *,
    n_select: int,
    local_blocks: int,
    causal: bool,
    block_valid: torch.Tensor | None = None,
    block_keep_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick key blocks per query block: the local window plus the best-scoring others.

    q_blocks / k_blocks: ``[B, H, nb, bs, d]``. Score = mean-pooled query . mean-pooled key per block pair
    (``[B, H, nb, nb]``). ``block_valid``: ``[B, nb]`` False for fully padded blocks;
    ``block_keep_count``: ``[B, nb]`` unpadded keys per block (masked mean). Returns ``indices`` ``[B, H,
    nb, n_select]`` and ``valid`` (same shape, False where fewer than ``n_select`` blocks were allowed).
    """
    nb = q_blocks.size(2)
    with torch.no_grad():
        q_pool = q_blocks.mean(dim=3)
        if block_keep_count is None:
            k_pool = k_blocks.mean(dim=3)
        else:
            k_pool = k_blocks.sum(dim=3) / block_keep_count.clamp(min=1)[:, None, :, None].to(k_blocks.dtype)
        scores = (q_pool @ k_pool.transpose(-1, -2)).float()
        qi = torch.arange(nb, device=q_blocks.device)
        delta = qi[None, :] - qi[:, None]  # key block - query block
        allowed = delta <= 0 if causal else torch.ones(nb, nb, dtype=torch.bool, device=q_blocks.device)
        local = torch.zeros(nb, nb, dtype=torch.bool, device=q_blocks.device)
        for off in _local_offsets(local_blocks, causal):
            local |= delta == off
        allowed = allowed.expand(scores.shape)
        if block_valid is not None:
            allowed = allowed & block_valid[:, None, None, :]
        scores = scores.masked_fill(local & allowed, float("inf"))
        scores = scores.masked_fill(~allowed, float("-inf"))
        top, indices = scores.topk(n_select, dim=-1, sorted=False)
        return indices, top > float("-inf")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    top_k_blocks: int = 16,
    local_blocks: int = 1,
    n_global_tokens: int = 0,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    decay_rates: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    q_chunk_blocks: int = 0,
) -> torch.Tensor:
    """Dynamic block-sparse attention; q/k/v ``[B, H, N, d]`` -> ``[B, H, N, d]``.

    ``decay_rates`` ``[H]`` with ``timestamps`` ``[B, N]`` adds ``-rate_h * |t_q - t_k|``. Query blocks are
    processed ``q_chunk_blocks`` at a time (0: as many as keep one chunk's score tensor near
    ``CHUNK_SCORES`` elements) in a block-major layout ``[n_blocks, B, H, ...]``, so each chunk's queries and
    outputs are contiguous slices.
    """
    bsz, n_heads, n, d = q.shape
    bs = block_size
    nb = -(-n // bs)
    pad = nb * bs - n
    g = min(n_global_tokens, n)
    kpm = key_padding_mask
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        tail = torch.ones(bsz, pad, dtype=torch.bool, device=q.device)
        base = kpm if kpm is not None else torch.zeros(bsz, n, dtype=torch.bool, device=q.device)
        kpm = torch.cat([base, tail], dim=1)
        if timestamps is not None:
            timestamps = F.pad(timestamps, (0, pad))
    use_decay = decay_rates is not None
    if use_decay and timestamps is None:
        timestamps = torch.arange(nb * bs, device=q.device, dtype=torch.float32).expand(bsz, -1)

    q_blocks = (q * d**-0.5).view(bsz, n_heads, nb, bs, d)
    k_blocks = k.reshape(bsz, n_heads, nb, bs, d)
    block_valid = keep_count = None
    k_for_pool = k_blocks
    if kpm is not None:
        keep_count = (~kpm).view(bsz, nb, bs).sum(-1)
        block_valid = keep_count > 0
        k_for_pool = k_blocks.masked_fill(kpm.view(bsz, 1, nb, bs, 1), 0.0)
    n_sel = min(top_k_blocks + local_blocks, nb)
    span = n_sel * bs
    sel_idx, sel_valid = select_blocks(
        q_blocks,
        k_for_pool,
        n_select=n_sel,
        local_blocks=local_blocks,
        causal=causal,
        block_valid=block_valid,
        block_keep_count=keep_count,
    )
    need_mask = causal or kpm is not None or g > 0 or not bool(sel_valid.all())
    if q_chunk_blocks <= 0:
        q_chunk_blocks = max(1, CHUNK_SCORES // (bsz * n_heads * bs * (span + g)))

    # block-major layout: [nb, B, H, ...]
    q_bm = q_blocks.permute(2, 0, 1, 3, 4).contiguous()
    idx_bm = sel_idx.permute(2, 0, 1, 3).contiguous()  # [nb, B, H, n_sel]
    valid_bm = sel_valid.permute(2, 0, 1, 3)
    k_rows = k.reshape(bsz * n_heads * nb, bs * d)
    v_rows = v.reshape(bsz * n_heads * nb, bs * d)
    head_base = (torch.arange(bsz * n_heads, device=q.device) * nb).view(bsz, n_heads, 1)
    arange_bs = torch.arange(bs, device=q.device)
    rates = decay_rates.view(1, 1, -1, 1, 1) if use_decay else None
    if g:
        k_glob_t = k[:, :, :g].transpose(-1, -2).unsqueeze(0)  # [1, B, H, d, g]
        v_glob = v[:, :, :g].unsqueeze(0)  # [1, B, H, g, d]

    def gather_keys(table: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """table [B, N] at key positions kpos [nc, B, H, S] -> [nc, B, H, S]."""
        nc = kpos.size(0)
        flat = kpos.permute(1, 0, 2, 3).reshape(bsz, -1)
        return table.gather(1, flat).view(bsz, nc, n_heads, -1).permute(1, 0, 2, 3)

    # Without autograd, reuse the large per-chunk buffers (fresh multi-MB allocations cost page faults)
    # and write each chunk's output straight into the result.
    reuse = not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (q, k, v, decay_rates)
    )
    buffers: dict[str, torch.Tensor] = {}

    def buffer(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        if not reuse:
            return None
        numel = math.prod(shape)
        buf = buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    out_bm = torch.empty(nb, bsz, n_heads, bs, d, dtype=v.dtype, device=v.device) if reuse else None
    outs = []
    for c0 in range(0, nb, q_chunk_blocks):
        c1 = min(nb, c0 + q_chunk_blocks)
        nc = c1 - c0
        idx = idx_bm[c0:c1]  # [nc, B, H, n_sel]
        flat = (idx + head_base).reshape(-1)
        kg = torch.index_select(k_rows, 0, flat, out=buffer("k", (flat.numel(), bs * d), k_rows))
        vg = torch.index_select(v_rows, 0, flat, out=buffer("v", (flat.numel(), bs * d), v_rows))
        kg = kg.view(nc, bsz, n_heads, span, d)
        vg = vg.view(nc, bsz, n_heads, span, d)
        qc = q_bm[c0:c1]  # [nc, B, H, bs, d]
        scores = torch.matmul(qc, kg.transpose(-1, -2), out=buffer("s", (nc, bsz, n_heads, bs, span), kg))
        if need_mask or use_decay:
            kpos = (idx.unsqueeze(-1) * bs + arange_bs).flatten(-2)  # [nc, B, H, span]
            qpos = torch.arange(c0, c1, device=q.device).unsqueeze(-1) * bs + arange_bs
            qpos = qpos.view(nc, 1, 1, bs, 1)
        if use_decay:
            tq = timestamps[:, c0 * bs : c1 * bs].reshape(bsz, nc, bs).transpose(0, 1)
            tq = tq.reshape(nc, bsz, 1, bs, 1)
            tk = gather_keys(timestamps, kpos).unsqueeze(-2)
            scores = scores - rates.to(scores.dtype) * (tq - tk).abs()
        if need_mask:
            key_mask = ~valid_bm[c0:c1].repeat_interleave(bs, dim=-1)
            if g:
                key_mask = key_mask | (kpos < g)
            if kpm is not None:
                key_mask = key_mask | gather_keys(kpm, kpos)
            mask = key_mask.unsqueeze(-2)
            if causal:
                mask = mask | (kpos.unsqueeze(-2) > qpos)
            scores = scores.masked_fill_(mask, -math.inf) if reuse else scores.masked_fill(mask, -math.inf)
        if g:
            sg = qc @ k_glob_t  # [nc, B, H, bs, g]
            if use_decay:
                tkg = timestamps[:, :g].view(1, bsz, 1, 1, g)
                sg = sg - rates.to(sg.dtype) * (tq - tkg).abs()
            gmask = torch.zeros(1, 1, 1, 1, g, dtype=torch.bool, device=q.device)
            if kpm is not None:
                gmask = gmask | kpm[:, :g].view(1, bsz, 1, 1, g)
            if causal:
                gmask = gmask | (torch.arange(g, device=q.device) > qpos)
            sg = sg.masked_fill(gmask, -math.inf)
            scores = torch.cat([sg, scores], dim=-1)
        if reuse and scores.dtype in (torch.float32, torch.float64):
            probs_buf = buffer("p", tuple(scores.shape), scores)
            probs = torch.ops.aten._softmax.out(scores, -1, False, out=probs_buf)
        else:
            probs = scores.softmax(dim=-1)
        if need_mask:
            probs = probs.nan_to_num_(0.0) if reuse else probs.nan_to_num(0.0)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        if g:
            out = probs[..., g:] @ vg + probs[..., :g] @ v_glob
            if out_bm is not None:
                out_bm[c0:c1] = out
        elif out_bm is not None:
            torch.matmul(probs, vg, out=out_bm[c0:c1])
        else:
            out = probs @ vg
        if out_bm is None:
            outs.append(out)
    if out_bm is None:
        out_bm = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    out = out_bm.permute(1, 2, 0, 3, 4).reshape(bsz, n_heads, nb * bs, d)
    return out[:, :, :n] if pad else out


class Attention(nn.Module):
    """Multi-head self-attention; ``kind`` and options come from ``AttentionConfig``."""

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim)
        if cfg.uses_decay:
            self.decay_raw = nn.Parameter(torch.full((cfg.n_heads,), _inverse_softplus(cfg.decay_init)))
        else:
            self.register_parameter("decay_raw", None)

    def decay_rates(self) -> torch.Tensor | None:
        """Per-head decay ``lambda_h = softplus(raw_h) >= 0`` (None without decay)."""
        return None if self.decay_raw is None else F.softplus(self.decay_raw)

    def forward(
        self,
        x: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x ``[B, N, dim]``; timestamps ``[B, N]`` float (decay); key_padding_mask ``[B, N]``, True = pad."""
        cfg = self.cfg
        bsz, n, _ = x.shape
        h, d = cfg.n_heads, cfg.head_dim
        q, k, v = (w(x).view(bsz, n, h, d).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        rates = self.decay_rates()
        if rates is not None:
            if timestamps is None:
                timestamps = torch.arange(n, device=x.device, dtype=torch.float32).expand(bsz, n)
            else:  # only differences matter: shift first so float32 keeps e.g. epoch-second precision
                timestamps = (timestamps - timestamps[:, :1]).float()
        dropout_p = cfg.dropout if self.training else 0.0
        if cfg.kind == "sparse":
            out = sparse_attention(
                q,
                k,
                v,
                block_size=cfg.block_size,
                top_k_blocks=cfg.top_k_blocks,
                local_blocks=cfg.local_blocks,
                n_global_tokens=cfg.n_global_tokens,
                causal=cfg.causal,
                key_padding_mask=key_padding_mask,
                timestamps=timestamps if rates is not None else None,
                decay_rates=rates,
                dropout_p=dropout_p,
                q_chunk_blocks=cfg.q_chunk_blocks,
            )
        else:
            bias = decay_bias(rates, timestamps, timestamps) if rates is not None else None
            out = dense_attention(
                q,
                k,
                v,
                causal=cfg.causal,
                key_padding_mask=key_padding_mask,
                bias=bias,
                dropout_p=dropout_p,
            )
        return self.wo(out.transpose(1, 2).reshape(bsz, n, cfg.dim))
