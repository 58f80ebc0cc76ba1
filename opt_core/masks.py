"""How attention masks its scores, once for the three frameworks: the value a masked score gets, and why.

Siblings: `masked_softmax` in `opt_torch/modeling.py`, `opt_tf/modeling.py` and `opt_flax/modeling.py` applies it
(torch's SDPA path masks inside the kernel, with a boolean mask).

HF transformers' issue #17433 (OPT in float16 gave NaN on left-padded batches; the NaN first appeared at padded
positions) is what this avoids. HF added the mask to the scores: in float16 `score + finfo(float16).min` rounds
to -inf once the score is below -16, a sum of two such masks is -inf whatever the score (in bfloat16 too), and a
-inf fill is -inf already (HF's Flax OPT, #20666; its later -1e9 is -inf in float16 as well). A padded query, which
may attend to nothing, then has a row of -inf, its softmax is NaN, and the next layer's `probs @ v` carries the
NaN into every real token of its row (0 * NaN is NaN). HF's fix (#17437) clamped the sum and upcast the softmax.

Here:
- The mask is applied once, through a select, never added to a score, so nothing can overflow.
- The select happens after the scores are upcast to float32 (softmax runs in float32 in every compute dtype), with
  float32's minimum. That is below every finite float16 (-65504) or bfloat16 (-3.39e38) score, so a real score,
  however negative, still outweighs a masked slot; a fill in the half dtype's own minimum would tie with a real
  score there. In float32 the upcast is a no-op and the fill is what it always was: the bits do not change.
- A query with nothing to attend to (its row all fill, which softmaxes to uniform) gets zero attention, as torch's
  SDPA gives.
"""

from __future__ import annotations

import numpy as np

# What a masked score becomes in the float32 softmax: float32's minimum, finite, so a row of nothing but masked
# slots softmaxes to uniform (then zeroed), never to NaN as a row of -inf would.
MASKED_SCORE = float(np.finfo(np.float32).min)
