"""One adapter per framework for the tests that check opt_torch, opt_tf and opt_flax the same way
(`test_frameworks.py`); the `framework` fixture in `conftest.py` hands a test one of them.

An adapter imports its framework only when made, and hides only how that framework is called: inputs go in as
numpy, outputs come back as the framework's own (`np.asarray` reads them, `numpy` also bfloat16 torch tensors), and
weights come out as canonical numpy arrays (HF's torch names and layouts) so that tests compare them by name.
"""

from __future__ import annotations

import numpy as np
from conftest import HEADS


class Adapter:
    """What the shared tests do with a model; the subclasses fill in what differs."""

    name: str  # the test id
    prefix: str  # of the public class names: "", "TF", "Flax"
    bf16_compute: dict  # from_pretrained arguments that compute in bfloat16
    bf16_params: str  # the dtype the weights keep then
    auto_dtype = {"dtype": "auto"}  # from_pretrained arguments that keep the checkpoint's dtype

    def __init__(self, package):
        self.package = package

    def model_class(self, head: str = "causal_lm"):
        return getattr(self.package, self.prefix + HEADS[head])

    def load(self, folder, head: str = "causal_lm", attn: str | None = None, **kwargs):
        """from_pretrained; `attn` picks torch's attention implementation (the others have one)."""
        return self.model_class(head).from_pretrained(folder, **kwargs)

    def fresh(self, config, head: str = "causal_lm"):
        return self.model_class(head)(config)

    def __call__(self, model, *args, **kwargs):
        return model(*args, **kwargs)

    def numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def state(self, model) -> dict[str, np.ndarray]:
        """{canonical name: numpy array in torch layout} of every parameter."""
        return model.canonical_state()

    # Cached decoding. HF's tuple cache (torch, TF) grows from nothing and the mask covers the tokens so far.

    def start_cache(self, model, batch: int, max_length: int):
        return None

    def cache_mask(self, mask: np.ndarray, end: int) -> np.ndarray:
        return mask[:, :end]

    def cache_length(self, past) -> int:
        return past[0][0].shape[2]  # B N S H

    def decode_step(self, model):
        return lambda *args, **kwargs: self(model, *args, **kwargs)


def torch_call(model, *args, **kwargs):
    """Calls a torch module (ours or HF's) on numpy inputs, without autograd."""
    import torch

    args = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in args]
    kwargs = {k: torch.from_numpy(x) if isinstance(x, np.ndarray) else x for k, x in kwargs.items()}
    with torch.no_grad():
        return model(*args, **kwargs)


class TorchAdapter(Adapter):
    name, prefix = "torch", ""
    bf16_params = "bfloat16"

    def __init__(self):
        import torch

        import opt_torch

        super().__init__(opt_torch)
        self.bf16_compute = {"dtype": torch.bfloat16}

    def load(self, folder, head="causal_lm", attn=None, **kwargs):
        if attn is not None:
            kwargs["attn_implementation"] = attn
        return super().load(folder, head, **kwargs)

    def __call__(self, model, *args, **kwargs):
        return torch_call(model, *args, **kwargs)

    def numpy(self, x):
        import ml_dtypes
        import torch

        if isinstance(x, np.ndarray):  # already read (e.g. by `main_output`)
            return x
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own: ml_dtypes', as JAX and TF give
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()


class TFAdapter(Adapter):
    name, prefix = "tf", "TF"
    bf16_compute, bf16_params = {"dtype": "mixed_bfloat16"}, "float32"  # Keras' mixed policy: float32 variables

    def __init__(self):
        import opt_tf

        super().__init__(opt_tf)


class FlaxAdapter(Adapter):
    name, prefix = "flax", "Flax"
    bf16_compute, bf16_params = {"dtype": "bfloat16"}, "float32"  # param_dtype stays float32
    auto_dtype = {"dtype": "auto", "param_dtype": "auto"}

    def __init__(self):
        import jax

        import opt_flax

        # The oracle runs fp32 matmuls in full precision; so must we (TPUs default to bf16 passes).
        jax.config.update("jax_default_matmul_precision", "highest")
        super().__init__(opt_flax)
        self.jitted = {}  # id(model) -> (model, jax.jit(model.__call__)): one compile per model and input shape

    def __call__(self, model, *args, use_cache=None, **kwargs):
        return model(*args, **kwargs)  # as HF Flax: no use_cache, a cache passed in comes back updated

    def state(self, model):
        from opt_flax.pretrained import params_to_canonical

        return params_to_canonical(model.params, model.config, model.head)

    # HF Flax's cached decoding: a static cache from init_cache, the mask over all its slots, a jitted step.

    def start_cache(self, model, batch, max_length):
        return model.init_cache(batch, max_length)

    def cache_mask(self, mask, end):
        return mask

    def cache_length(self, past):
        return int(past.index)

    def decode_step(self, model):
        import jax

        if id(model) not in self.jitted:
            self.jitted[id(model)] = (model, jax.jit(model.__call__))
        _, step = self.jitted[id(model)]
        return lambda *args, use_cache=None, **kwargs: step(*args, params=model.params, **kwargs)


ADAPTERS = {"torch": TorchAdapter, "tf": TFAdapter, "flax": FlaxAdapter}


def main_output(out, head):
    """The head's main output(s) as numpy: logits, pooled logits, or stacked start/end logits."""
    if head == "base":
        return np.asarray(out.last_hidden_state)
    if head == "question_answering":
        return np.stack([np.asarray(out.start_logits), np.asarray(out.end_logits)], -1)
    return np.asarray(out.logits)
