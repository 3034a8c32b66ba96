"""Curvature factors (K-FAC / EK-FAC) of the Gauss-Newton Hessian, and the inverse-Hessian-vector product.

Per tracked layer, with a_t the layer input (homogeneous 1 appended) and g_t the pseudo-gradient w.r.t. the
layer output at token t (labels sampled from the model, so G is the true Fisher = Gauss-Newton for softmax
cross-entropy), and N fitting sequences of T_n real tokens:

    A = (1 / sum_n T_n) sum_{n,t} a_t a_t^T             activation covariance,  (d_in, d_in)
    S = (1 / N)         sum_{n,t} g_t g_t^T             pseudo-gradient covariance, (d_out, d_out)
    A = Q_A diag(l_A) Q_A^T,  S = Q_S diag(l_S) Q_S^T   eigendecompositions
    G_l ~ A (x) S                                        K-FAC (per-sequence scale: tokens summed)
    Lambda = (1/N) sum_n (Q_S^T D_n Q_A)^2               EK-FAC eigenvalue correction (paper Eq 20),
             with D_n = sum_t g_t a_t^T the per-sequence pseudo-gradient, (d_out, d_in)

IHVP (paper Eq 21):  (G_l + lambda I)^{-1} V = Q_S [ (Q_S^T V Q_A) / (Lambda + lambda) ] Q_A^T,
with lambda = damping_factor x mean(Lambda) per layer (0.1 by default) unless an absolute damping is given.

Strategies: "ekfac" (above), "kfac" (Lambda = l_S l_A^T), "diagonal" (Lambda = (1/N) sum_n D_n^2 in the
parameter basis), "identity" (no preconditioning: the plain gradient dot product baseline).

Sampled labels of fitting batch i come from a generator seeded by (seed, pass, i), so the numbers do not depend
on how batches are split over processes. Under torch.distributed (`distributed.py`) batch i is processed by rank
i mod N and the sums and counts are all-reduced. With `checkpoint_every`, a pass saves its running sums every
K batches and a rerun continues from there.

Output blocks (FactorArguments.output_blocks = k, ekfac and kfac): S is approximated as block-diagonal over k equal
blocks of output units, S ~ diag(S_1, ..., S_k) with S_j (d_out/k, d_out/k), each eigendecomposed on its own
(the paper's block-diagonal approximation for its largest model); Q_S is then block-diagonal, stored (k, b, b),
b = d_out / k, and the correction and the IHVP run block by block. k = d_out makes Q_S = I (S diagonal).

Covariance subset (FactorArguments.covariance_fraction = f, ekfac and kfac): A and S (so Q_A, Q_S) come from the
first ceil(f x batches) fitting batches only, with T_n and N counted over those; the eigenvalue correction Lambda
still sums over all N sequences, so a fit reads the data 1 + f times instead of 2 (time and accuracy against
f = 1: figures/bench/covariance_subset.md).

Layout of this package (one job per file):
    types.py        FactorArguments, LayerFactors (one class per basis), Factors (checks, damping, IHVP)
    passes.py       the fitting passes over data: covariance, eigendecomposition, eigenvalue correction
    strategies.py   ekfac, kfac, diagonal, identity: which passes each runs and what it keeps per layer
    stages.py       on disk: manifest, one file per finished stage, pass checkpoints, save / load of factors
    fit.py          fit_factors: the staged run
"""
