"""PerRes Apply Residuals: W' = W + strength·ΔW everywhere (normal sampling in the paper)."""
from __future__ import annotations

from comfy_api.latest import io

from ..perres_core.residual import ResidualSet
from .node_guard import guarded
from .host.model import require_fits, with_residual_weights
from .types import Residuals

NAME = "PerRes Apply Residuals"


class ApplyResiduals(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerResApplyResiduals",
            display_name=NAME,
            category="PerRes",
            description="Applies residuals to every location (W + strength·ΔW) as a weight patch: no cost while "
                        "sampling, identical to loading the saved file with LoraLoaderModelOnly.",
            inputs=[
                io.Model.Input("model", tooltip="A model of the family the residual was trained on (SD1.x, SDXL "
                                                "family, Anima or Krea 2; any checkpoint of it); a patched clone is "
                                                "returned."),
                Residuals.Input("residuals", tooltip="From PerRes Train Residuals or PerRes Load Residuals."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="1 applies the learned residual; 0 gives the base model."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone; connect it to the sampler.")],
        )

    @classmethod
    @guarded
    def execute(cls, model, residuals: ResidualSet, strength: float) -> io.NodeOutput:
        require_fits(model, residuals)
        return io.NodeOutput(with_residual_weights(model, residuals, strength))
