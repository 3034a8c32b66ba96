"""influence_core: EK-FAC influence functions for any torch model whose tracked layers are affine.

Data flow: model -> track_layers -> fit_factors -> query_gradients -> precondition_queries -> compute_scores.
"""

from .factors.fit import fit_factors
from .factors.stages import load_factors
from .factors.types import FactorArguments, FactorMismatchError, Factors, LayerFactors
from .lowrank import LowRankQuery, compress_queries
from .sharding import ShardArguments, read_scores, score_in_shards
from .tfidf import BM25Index
from .scores import InfluenceScores, ScoreArguments, compute_scores, precondition_queries, query_gradients
from .task import IGNORE_INDEX, CausalLMTask, Query, Task, encode_queries, iterate_batches, pad_sequences
from .tracking import (ATTENTION_PATTERNS, MLP_PATTERNS, LayerCapture, TrackedLayer, model_fingerprint,
                       per_sequence_gradients, track_layers)

__all__ = [
    "ATTENTION_PATTERNS", "BM25Index", "LowRankQuery", "ShardArguments", "compress_queries", "read_scores",
    "score_in_shards", "CausalLMTask", "FactorArguments", "FactorMismatchError", "Factors", "IGNORE_INDEX",
    "InfluenceScores", "LayerCapture", "LayerFactors", "MLP_PATTERNS", "Query", "ScoreArguments", "Task",
    "TrackedLayer", "compute_scores", "encode_queries", "fit_factors", "iterate_batches", "load_factors", "model_fingerprint",
    "pad_sequences", "per_sequence_gradients", "precondition_queries", "query_gradients", "track_layers",
]
