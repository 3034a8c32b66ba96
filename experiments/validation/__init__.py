"""Validation of the influence estimators against ground truth, one job per module:

    setups.py        models with their curvature data, scored training points and queries (digits MLP, micro zoo)
    estimators.py    EK-FAC, K-FAC, diagonal, identity (factor strategies) and LiSSA, one damping per layer
    ground_truth.py  exact damped-GNH influence (dense or CG) and the PBRF
    diagnostics.py   where the layer-wise estimators lose accuracy (dense models)
    metrics.py       correlations with the ground truths, summary tables, unconverged ground truths
    comparison.py    one model through every estimator and ground truth; the loop over models
    figures.py       the validation figure
    report.py        tables, figures, README.md and study.json through the studies' result path
    reference.py     the engine's ground-truth helpers, wherever the engine keeps them
    lds_setup.py     the LDS benchmark's base model, fine-tuning set and queries; the full-set fine-tune
    finetune.py      the one fine-tuning recipe; retrains cached per (job, seed), resumable, in processes
    attribution.py   the LDS methods' scores: factor strategies, LiSSA, TrackStar-, TRAK-style, BM25
    datamodels.py    LDS with bootstrap CIs and the noise ceiling; calibration slope and correlation
    retraining.py    the LDS benchmark and calibration end to end (`make lds`, experiments/lds.py)
"""
