"""`python -m opt_eval ...`: lm_eval's own command line, with the `opt-lm` model registered first.

python -m opt_eval --model opt-lm --model_args pretrained=facebook/opt-125m,framework=tf --tasks arc_easy
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lm_eval.__main__ import cli_evaluate  # noqa: E402

import opt_eval  # noqa: E402, F401  registers `opt-lm`

if __name__ == "__main__":
    cli_evaluate()
