"""The strategies: which fitting passes each runs (as named, resumable stages) and what it keeps per layer.

    ekfac      covariance -> eigendecomposition -> eigenvalue correction    Lambda = (1/N) sum_n (Q_S^T D_n Q_A)^2
               (token_cache_bytes > 0: the correction from the tokens the covariance pass kept, one model pass)
    kfac       covariance -> eigendecomposition                              Lambda = l_S l_A^T
    diagonal   eigenvalue correction in the parameter basis                 Lambda = (1/N) sum_n D_n^2
    identity   nothing (plain gradient dot products)

`STRATEGIES[name]` is the instance fit_factors and load_factors use. A strategy's `fit(run)` asks `run.stage(name,
compute)` for each stage, so a finished stage is read back instead of recomputed (stages.StageDirectory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from . import passes
from .types import DiagonalFactors, EigenbasisFactors, IdentityFactors, LayerFactors, Tensors

if TYPE_CHECKING:
    from .fit import FitRun



class Strategy:
    """Base class: a name, the LayerFactors type it produces, and `fit`."""

    name: ClassVar[str]
    layer_type: ClassVar[type[LayerFactors]]
    reads_data: ClassVar[bool] = True  # False: fitting needs no pass over the data (so a one-shot iterator is fine)

    def fit(self, run: "FitRun") -> dict[str, LayerFactors]:
        raise NotImplementedError

    def load(self, name: str, tensors: Tensors) -> LayerFactors:
        """One layer's factors from the saved tensors ('<layer>.<field>' keys)."""
        return self.layer_type.from_tensors(name, tensors)


def _covariance_and_eigenbasis(run: "FitRun", cache: passes.TokenCache | None = None) -> Tensors:
    """The eigendecomposition; with a cache, the covariance pass fills it (unless its stage was saved)."""
    cov = run.stage("covariance", lambda: passes.covariance_pass(run.model, run.layers, run.task, run.batches,
                                                                 run.args, run.checkpoint("covariance"), cache))
    return run.stage("eigendecomposition", lambda: passes.eigendecomposition(cov, run.names, run.args))


def _correction(run: "FitRun", eig: Tensors | None) -> Callable[[], Tensors]:
    return lambda: passes.correction_pass(run.model, run.layers, run.task, run.batches, run.args, eig,
                                          run.checkpoint("eigenvalue_correction"))


def _correction_one_pass(run: "FitRun", eig: Tensors, cache: passes.TokenCache) -> Callable[[], Tensors]:
    """From the cache the covariance pass filled; when that stage was read back from disk instead (a rerun), from a
    model pass drawing the covariance pass's labels: the same numbers."""
    if len(cache):
        return lambda: passes.correction_from_cache(run.layers, cache, run.args, eig)
    return lambda: passes.correction_pass(run.model, run.layers, run.task, run.batches, run.args, eig, label_pass=0)


class EKFAC(Strategy):
    name, layer_type = "ekfac", EigenbasisFactors

    def fit(self, run: "FitRun") -> dict[str, LayerFactors]:
        if run.args.token_cache_bytes:
            if run.checkpoint("covariance") is not None:  # checkpoint_every set after FactorArguments was made
                raise ValueError(f"token_cache_bytes={run.args.token_cache_bytes} keeps tokens in memory, which a pass "
                                 f"checkpoint (checkpoint_every={run.args.checkpoint_every}) cannot restore; use "
                                 "checkpoint_every=0, or token_cache_bytes=0")
            cache = passes.TokenCache(run.args.token_cache_bytes)
            cache.check_budget(run.layers, run.batches, run.args)
            eig = _covariance_and_eigenbasis(run, cache)
            corr = run.stage("eigenvalue_correction", _correction_one_pass(run, eig, cache))
            if cache.nbytes:  # what the kept tokens took at their peak (this rank), beside the stage timings
                run.stages.manifest["token_cache_peak_bytes"] = cache.nbytes
        else:
            eig = _covariance_and_eigenbasis(run)
            corr = run.stage("eigenvalue_correction", _correction(run, eig))
        return {n: EigenbasisFactors(n, corr[f"{n}.eigenvalues"], eig[f"{n}.activation_eigenvectors"],
                                     eig[f"{n}.gradient_eigenvectors"]) for n in run.names}


class KFAC(Strategy):
    name, layer_type = "kfac", EigenbasisFactors

    def fit(self, run: "FitRun") -> dict[str, LayerFactors]:
        eig = _covariance_and_eigenbasis(run)
        # l_S of a block-diagonal S: the blocks' eigenvalues side by side, (k, b) -> (d_out,)
        return {n: EigenbasisFactors(n, torch.outer(eig[f"{n}.gradient_eigenvalues"].reshape(-1),
                                                    eig[f"{n}.activation_eigenvalues"]),
                                     eig[f"{n}.activation_eigenvectors"], eig[f"{n}.gradient_eigenvectors"])
                for n in run.names}


class Diagonal(Strategy):
    name, layer_type = "diagonal", DiagonalFactors

    def fit(self, run: "FitRun") -> dict[str, LayerFactors]:
        diag = run.stage("eigenvalue_correction", _correction(run, None))
        return {n: DiagonalFactors(n, diag[f"{n}.eigenvalues"]) for n in run.names}


class Identity(Strategy):
    name, layer_type, reads_data = "identity", IdentityFactors, False

    def fit(self, run: "FitRun") -> dict[str, LayerFactors]:
        return {n: IdentityFactors(n) for n in run.names}


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (EKFAC(), KFAC(), Diagonal(), Identity())}
