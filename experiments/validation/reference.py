"""The engine's ground-truth helpers (dense GNH, CG, LiSSA, PBRF), imported from wherever the engine keeps them.

influence_core keeps its reference code in `influence_core.reference` (newer layout) or in top-level modules
(older layout); validation code imports these names from here, so it does not depend on which.
"""

from __future__ import annotations

try:  # newer layout: influence_core/reference/{baselines,gnh,lissa,pbrf}.py
    from influence_core.reference.baselines import (exact_gauss_newton, exact_ihvp, flatten_layers,
                                                    parameter_gradients, unflatten_layers)
    from influence_core.reference.gnh import (conjugate_gradient, gnh_vector_product, layer_damping_vector,
                                              num_tracked_parameters)
    from influence_core.reference.lissa import LissaArguments, LissaResult, lissa_ihvp
    from influence_core.reference.pbrf import PBRFArguments, pbrf_influence
except ImportError:  # older layout: influence_core/{baselines,gnh,lissa,pbrf}.py
    from influence_core.baselines import (exact_gauss_newton, exact_ihvp, flatten_layers, parameter_gradients,
                                          unflatten_layers)
    from influence_core.gnh import conjugate_gradient, gnh_vector_product, layer_damping_vector, num_tracked_parameters
    from influence_core.lissa import LissaArguments, LissaResult, lissa_ihvp
    from influence_core.pbrf import PBRFArguments, pbrf_influence

__all__ = ["LissaArguments", "LissaResult", "PBRFArguments", "conjugate_gradient", "exact_gauss_newton", "exact_ihvp",
           "flatten_layers", "gnh_vector_product", "layer_damping_vector", "lissa_ihvp", "num_tracked_parameters",
           "parameter_gradients", "pbrf_influence", "unflatten_layers"]
