"""Query batching (paper Sec 3.2): each layer's preconditioned query kept as a rank-r approximation.

For layer l, the preconditioned query q_l' (d_out, d_in) is truncated by SVD to

    q_l' ~ U diag(s) V^T = L R,   L = U diag(s): (d_out, r),   R = V^T: (r, d_in)

and scored against a training sequence without forming its per-sequence gradient D = sum_t g_t a_t^T:

    <q_l', D> = sum_t g_t^T q_l' a_t = sum_t (g_t^T L)(R a_t)        cost T r (d_out + d_in) per query

The summand is the token-wise influence of input token t, so token scores cost nothing extra. Storage per
query and layer is r (d_out + d_in) numbers instead of d_out d_in. At r >= min(d_out, d_in) the SVD is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_QUERY_RANK = 32  # paper Sec 3.2 (and kronfluence's default)


@dataclass
class LowRankQuery:
    """One layer's preconditioned queries in factored form: q[i] ~ left[i] @ right[i].

    left:  (Q, d_out, r)  U diag(s)
    right: (Q, r, d_in)   V^T
    """

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    @property
    def num_queries(self) -> int:
        return self.left.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Q, d_out, d_in), as the dense tensor it stands for."""
        return (self.left.shape[0], self.left.shape[1], self.right.shape[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    def dense(self) -> torch.Tensor:
        """The rank-r matrices, (Q, d_out, d_in)."""
        return self.left @ self.right

    def nbytes_per_query(self) -> int:
        return (self.left[0].numel() + self.right[0].numel()) * self.left.element_size()

    def to(self, *args, **kwargs) -> "LowRankQuery":
        return LowRankQuery(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def select(self, rows) -> "LowRankQuery":
        return LowRankQuery(self.left[rows], self.right[rows])


def check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"query_rank must be a positive integer (paper: 32), got {rank!r}")
    return rank


def compress_query(query: torch.Tensor, rank: int) -> LowRankQuery:
    """Best rank-r approximation (Eckart-Young) of each (d_out, d_in) matrix of query (Q, d_out, d_in).

    Returned as left = U_r S_r (Q, d_out, r) and right = V_r^T (Q, r, d_in), in the query's dtype; rank is capped at
    min(d_out, d_in). Computed in float64 from the eigendecomposition of the smaller Gram matrix (X^T X, or X X^T
    when d_out < d_in) instead of a full SVD: the same truncation (to ~1e-14 relative, tests/test_lowrank.py) at
    2.8-5.6x less time on Pythia-160m-sized layers (figures/bench/real_shape.md).
    """
    check_rank(rank)
    if query.dim() != 3:
        raise ValueError(f"expected preconditioned queries of shape (Q, d_out, d_in), got {tuple(query.shape)}")
    r = min(rank, query.shape[1], query.shape[2])
    x = query.double()
    wide = x.shape[1] < x.shape[2]
    tall = x.transpose(1, 2) if wide else x  # (Q, m, n) with n = min(d_out, d_in)
    _, vectors = torch.linalg.eigh(tall.transpose(1, 2) @ tall)  # ascending eigenvalues s^2
    v = vectors[..., -r:].flip(-1)  # the r largest, in descending order as an SVD gives them: (Q, n, r)
    us = tall @ v  # U_r S_r of `tall`, (Q, m, r)
    if not wide:
        left, right = us, v.transpose(1, 2)
    else:  # X = tall^T ~ v (us)^T: left singular vectors v, right ones us / s
        s = us.norm(dim=1, keepdim=True)  # (Q, 1, r)
        left = v * s
        right = (us / torch.where(s > 0, s, torch.ones_like(s))).transpose(1, 2)
    return LowRankQuery(left.to(query.dtype).contiguous(), right.to(query.dtype).contiguous())


def uses_low_rank(shape: tuple[int, ...], rank: int | None, force: bool | None = None) -> bool:
    """Path choice for one layer: low-rank when forced, or when a rank is set and it truncates
    (rank < min(d_out, d_in)); otherwise the dense path, which is exact and, at full rank, no more expensive."""
    if force is not None:
        return force
    return rank is not None and rank < min(shape[-2], shape[-1])


def compress_queries(preconditioned: dict[str, torch.Tensor], rank: int | None = DEFAULT_QUERY_RANK,
                     force: bool | None = None) -> dict[str, torch.Tensor | LowRankQuery]:
    """Per layer, a LowRankQuery where `uses_low_rank` says so, else the dense tensor unchanged.

    force=True compresses every layer (rank capped at min(d_out, d_in): exact), force=False none.
    """
    if rank is not None:
        check_rank(rank)
    out: dict[str, torch.Tensor | LowRankQuery] = {}
    for name, q in preconditioned.items():
        if isinstance(q, LowRankQuery):
            out[name] = q
        elif uses_low_rank(q.shape, rank, force):
            out[name] = compress_query(q, rank if rank is not None else min(q.shape[-2:]))
        else:
            out[name] = q
    return out


def query_nbytes(queries: dict[str, torch.Tensor | LowRankQuery]) -> int:
    """Bytes of the stored preconditioned queries per query, summed over layers."""
    total = 0
    for q in queries.values():
        total += q.nbytes_per_query() if isinstance(q, LowRankQuery) else q[0].numel() * q.element_size()
    return total


def low_rank_token_scores(activations: torch.Tensor, output_gradients: torch.Tensor, left_flat: torch.Tensor,
                          right_flat: torch.Tensor, rank: int) -> torch.Tensor:
    """Token-wise influence sum_j (g_t^T L_q)_j (R_q a_t)_j for every query q, as (Q, B, T).

    activations (B, T, d_in), output_gradients (B, T, d_out); left_flat (d_out, Q r) and right_flat (d_in, Q r)
    are the queries' factors laid side by side (see `flatten_factors`), so each batch costs two matmuls.
    """
    b, t, _ = activations.shape
    gl = output_gradients.reshape(b * t, -1) @ left_flat  # (B T, Q r)
    ar = activations.reshape(b * t, -1) @ right_flat  # (B T, Q r)
    gl.mul_(ar)  # in place: no third (B T, Q r) temporary in the hot loop
    return gl.reshape(b, t, -1, rank).sum(dim=-1).permute(2, 0, 1)


def flatten_factors(query: LowRankQuery) -> tuple[torch.Tensor, torch.Tensor]:
    """left (Q, d_out, r) -> (d_out, Q r); right (Q, r, d_in) -> (d_in, Q r); column q r + j is factor j of query q."""
    left = query.left.permute(1, 0, 2).reshape(query.left.shape[1], -1).contiguous()
    right = query.right.permute(2, 0, 1).reshape(query.right.shape[2], -1).contiguous()
    return left, right
