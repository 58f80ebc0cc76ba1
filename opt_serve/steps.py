"""The step model of each framework, imported only when asked for (so serving torch never imports TF or JAX)."""

from __future__ import annotations

FRAMEWORKS = ("torch", "tf", "flax")


def step_model(framework: str, model, slots: int, max_length: int):
    """The `opt_serve.engine.StepModel` of a loaded causal LM of `framework` ("torch", "tf" or "flax")."""
    if framework == "torch":
        from opt_serve.torch_step import TorchStepModel as step_class
    elif framework == "tf":
        from opt_serve.tf_step import TFStepModel as step_class
    elif framework == "flax":
        from opt_serve.flax_step import FlaxStepModel as step_class
    else:
        raise ValueError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    return step_class(model, slots, max_length)
