"""Triton kernels of source_fast, installed as `source_fast.kernels` (imported lazily by
`source_fast._triton.kernels()`, after TRITON_INTERPRET is settled). Each launcher has the signature and
contract of its twin in `source_fast.reference`."""

from .lam import accumulate_lambda_
from .pairwise import pairwise_scores
from .self_influence import self_scores

__all__ = ["accumulate_lambda_", "pairwise_scores", "self_scores"]
