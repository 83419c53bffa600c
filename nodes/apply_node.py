"""PerRes Apply Residuals: W' = W + strength·ΔW everywhere (normal sampling in the paper)."""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..perres_core.errors import PerResError
from ..perres_core.residual import ResidualSet
from .node_guard import guarded
from .host.model import require_fits, with_residual_weights
from .types import Residuals

NAME = "PerRes Apply Residuals"


def check_strength(strength: float) -> None:
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise PerResError(f"strength must be a finite number, got {strength}; 1 applies the learned residual, "
                          "0 gives the base model.")


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
                io.Model.Input("model", tooltip="An SD1.x or SDXL-family model (the family the residual was trained on); a "
                               "patched clone is returned."),
                Residuals.Input("residuals", tooltip="From PerRes Train Residuals or PerRes Load Residuals."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="1 applies the learned residual; 0 gives the base model."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone; connect it to the sampler.")],
        )

    @classmethod
    @guarded
    def execute(cls, model, residuals: ResidualSet, strength: float) -> io.NodeOutput:
        check_strength(strength)
        require_fits(model, residuals)
        return io.NodeOutput(with_residual_weights(model, residuals, strength))
