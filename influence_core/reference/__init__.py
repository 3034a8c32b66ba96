"""Ground truth for the engine, apart from what a user imports for scoring; used by validation and the tests.

    baselines.py   brute-force per-example gradients, the dense Gauss-Newton Hessian G, exact (G + lambda)^{-1} v
    gnh.py         Gauss-Newton-vector products without forming G, and conjugate gradient on them
    lissa.py       LiSSA, the stochastic Neumann-series IHVP (paper Sec 2.2)
    pbrf.py        the proximal Bregman response function the influence approximates (paper Eq 8-10)
"""
