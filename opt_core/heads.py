"""The framework-free rules of the task heads, as HF applies them: which position a sequence classifier pools and
which loss it uses. Each framework computes with its own ops; the decisions are made here once.
"""

from __future__ import annotations

from opt_core.config import OPTConfig

# HF's PyTorch class of each head: config.json's `architectures`, which every framework (and HF) reads.
ARCHITECTURE_OF_HEAD = {
    "base": "OPTModel",
    "causal_lm": "OPTForCausalLM",
    "sequence_classification": "OPTForSequenceClassification",
    "question_answering": "OPTForQuestionAnswering",
}


def pools_last_position(pad_token_id: int | None, batch_size: int, has_input_ids: bool) -> bool:
    """Whether a sequence classifier pools the last position instead of the last non-pad token of each row.

    HF's rule: with a pad id, the rightmost token that is not pad_token_id (so left and right padding both work);
    without one, only a batch of one can be pooled (at its last position); with `inputs_embeds` the padding
    cannot be seen, so the last position is taken.
    """
    if pad_token_id is None:
        if batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        return True
    return not has_input_ids


def problem_type(config: OPTConfig, num_labels: int, labels_are_integers: bool) -> str:
    """The sequence-classification loss: `config.problem_type`, else chosen (and recorded on the config) as HF
    does: regression for one label, single-label classification for integer labels, multi-label otherwise."""
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels_are_integers:
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    return config.problem_type
