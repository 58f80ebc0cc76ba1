"""lm-evaluation-harness backend `opt-lm`: evaluate any OPT checkpoint, adapter or int8 model of this library with
`lm_eval`, in PyTorch, Keras or Flax, with the numbers of lm_eval's own HF backend.

lm_eval 0.4 finds models in its registry only (no entry-point plugins), so the backend registers itself when this
package is imported:

    python -m opt_eval --model opt-lm --model_args pretrained=facebook/opt-125m,framework=flax --tasks lambada_openai
    opt-lm eval facebook/opt-125m --framework flax --tasks lambada_openai          # the same through opt-lm

    import opt_eval, lm_eval                                                        # from Python
    lm_eval.simple_evaluate(model="opt-lm", model_args={"pretrained": "facebook/opt-125m"}, tasks=["hellaswag"])

`opt_eval.backend.OPTLM` is the model class.
"""

from __future__ import annotations

from opt_core.errors import ConfigError

try:
    from opt_eval.backend import OPTLM
except ImportError as error:
    if getattr(error, "name", "") and error.name.split(".")[0] in ("lm_eval", "tqdm"):
        raise ConfigError(
            f"the opt-lm backend needs lm-evaluation-harness: pip install 'opt-lm[eval]' ({error})"
        ) from None
    raise

__all__ = ["OPTLM"]
