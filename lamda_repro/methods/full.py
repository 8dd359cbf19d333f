"""Full fine-tuning: every parameter of the model trains."""

from __future__ import annotations

from torch import nn

from lamda_repro.methods.base import Method, MethodContext, register_method


@register_method
class FullFineTuning(Method):
    type_name = "full"
    params_schema = {}

    def apply(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
