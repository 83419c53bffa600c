"""Socket types of the pack."""
from comfy_api.latest import io

# A perres_core.ResidualSet: the low-rank residuals of one concept plus its identifier and class word.
Residuals = io.Custom("PERRES_RESIDUALS")
# A list of nodes.host.lag_concepts.ConceptSpec (PerRes residuals or LoRA files) for multi-concept LAG.
Concepts = io.Custom("PERRES_CONCEPTS")
# The stock loss-map socket (Plot Loss Graph reads it). A host without io.LossMap still gets a socket of the same
# type name, so the Train node registers; the host self-check then refuses to run it and says why.
LossMap = getattr(io, "LossMap", None) or io.Custom("LOSS_MAP")
