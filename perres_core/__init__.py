"""Host-independent math and I/O for personalized residuals (Ham et al., 2024).

Nothing in this package imports ComfyUI: it is plain torch, safetensors and einops, so it can be
tested on tiny modules and reused by other front ends.
"""
from .residual import LowRankResidual, ResidualSet, ConceptInfo, rank_for
from .errors import PerResError

__version__ = "0.1.0"

__all__ = ["LowRankResidual", "ResidualSet", "ConceptInfo", "rank_for", "PerResError", "__version__"]
