"""The PyTorch decode path's CPU speedups (`opt_torch.linear`, `opt_torch.generation.prepare_decoding`): the LM
head stored transposed, the oneDNN-packed dense weights. Each changes how the products are computed, never which
model is computed: these tests hold them to the plain `F.linear` model."""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_ATOL, sample_batch

import opt_torch
from opt_torch import linear as torch_linear

IDS, MASK = (torch.from_numpy(a) for a in sample_batch())
OPTIONS = dict(max_new_tokens=12, eos_token_id=None, no_repeat_ngram_size=0)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, torch_linear.Linear)]


@pytest.fixture
def unpacked(monkeypatch):
    """The decode loops without the packed weights: every layer computes F.linear."""
    monkeypatch.setattr(torch_linear, "pack_linears", lambda modules, budget: None)
    monkeypatch.setattr(opt_torch.generation, "pack_linears", lambda modules, budget: None)


@pytest.fixture
def unpacked_loops(monkeypatch):
    """Call it to run the decode loops from then on with the layers' plain F.linear (packed copies kept)."""
    from contextlib import nullcontext

    return lambda: monkeypatch.setattr(opt_torch.generation, "packed_linears", nullcontext)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "untied"])
def test_packed_decode_gives_the_plain_models_ids(hf_checkpoint, variant):
    folder, hf = hf_checkpoint(variant)
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    before = model(IDS, attention_mask=MASK).logits
    ours = model.generate(IDS, attention_mask=MASK, **OPTIONS)
    assert all(layer.packed is not None for layer in _layers(model))  # every dense layer, the head included
    with torch.no_grad():
        expected = hf.generate(IDS, attention_mask=MASK, do_sample=False, min_new_tokens=12, **OPTIONS)
    assert torch.equal(ours, expected)
    assert torch.equal(model(IDS, attention_mask=MASK).logits, before)  # forward never uses the packed weights


def test_a_packed_layer_agrees_with_f_linear_and_a_changed_weight_is_not_served_stale():
    torch.manual_seed(0)
    layer = torch_linear.Linear(768, 3072)  # opt-125m's fc1
    x = torch.randn(3, 5, 768)
    assert layer.pack() == 768 * 3072 * 4 and layer.pack() == 0 and layer.is_packed()  # packed once
    with torch.no_grad():
        plain = layer(x)  # outside the decode loops: F.linear
        with torch_linear.packed_linears():
            packed = layer(x)
        assert not torch.equal(packed, plain)  # the packed op ran: another summation order
        torch.testing.assert_close(packed, plain, atol=FP32_ATOL, rtol=0)
        layer.weight.mul_(0.5)  # e.g. an optimizer step: the packed copy is stale now
        with torch_linear.packed_linears():
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert layer.pack() > 0  # the next generate packs it again
        with torch_linear.packed_linears():
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_fp16_weights_and_a_model_over_the_memory_budget_are_not_packed(hf_checkpoint, monkeypatch):
    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder, dtype="float16")  # packed: fp32 and bf16 only
    model.generate(IDS, attention_mask=MASK, **OPTIONS)
    assert all(layer.packed is None for layer in _layers(model))
    monkeypatch.setattr(opt_torch.generation, "_available_memory", lambda: 0)  # no room for the copies
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    model.generate(IDS, attention_mask=MASK, **OPTIONS)
    assert all(layer.packed is None for layer in _layers(model))
    assert model.lm_head.weight.is_contiguous()  # nor is the head moved


def test_a_packed_model_still_copies_and_saves_whole_and_repacks_after_a_data_swap(hf_checkpoint, tmp_path):
    import copy

    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    ids = model.generate(IDS, attention_mask=MASK, **OPTIONS)
    clone = copy.deepcopy(model)  # the opaque packed tensors are dropped from copies and pickles
    torch.save(model, tmp_path / "model.pt")
    assert all(layer.packed is None for layer in _layers(clone))
    assert torch.equal(clone.generate(IDS, attention_mask=MASK, **OPTIONS), ids)
    fc2 = model.model.decoder.layers[1].fc2
    fc2.weight.data = fc2.weight.data.clone()  # no in-place write: a new memory only
    assert not fc2.is_packed()
    assert torch.equal(model.generate(IDS, attention_mask=MASK, **OPTIONS), ids) and fc2.is_packed()


def test_lora_layers_decode_packed_with_their_adapter(hf_checkpoint, unpacked_loops):
    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    model.add_adapter({"r": 4, "target_modules": ["q_proj", "fc1"], "init_lora_weights": False}, seed=1)
    packed = model.generate(IDS, attention_mask=MASK, **OPTIONS)
    assert model.model.decoder.layers[0].fc1.is_packed()  # the LoRA layer's base weight
    unpacked_loops()
    assert torch.equal(model.generate(IDS, attention_mask=MASK, **OPTIONS), packed)


def test_bf16_packed_decode_gives_the_plain_bf16_models_ids(hf_checkpoint, unpacked_loops):
    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder, dtype="bfloat16")
    packed = model.generate(IDS, attention_mask=MASK, **OPTIONS)
    assert all(layer.packed is not None and layer.packed[0].dtype == torch.bfloat16 for layer in _layers(model))
    unpacked_loops()
    assert torch.equal(model.generate(IDS, attention_mask=MASK, **OPTIONS), packed)


def test_compiled_decode_packs_nothing(hf_checkpoint):
    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    compiled = model.generate(IDS, attention_mask=MASK, compile=True, **OPTIONS)
    assert all(layer.packed is None for layer in _layers(model))
    assert torch.equal(compiled, model.generate(IDS, attention_mask=MASK, **OPTIONS))


def test_the_tied_head_is_stored_transposed_and_still_tied(hf_checkpoint, unpacked):
    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    before = model(IDS, attention_mask=MASK).logits
    model.generate(IDS, attention_mask=MASK, **OPTIONS)
    weight = model.lm_head.weight
    assert weight is model.model.decoder.embed_tokens.weight and weight.t().is_contiguous()
    assert torch.equal(model(IDS, attention_mask=MASK).logits, before)  # bit-identical in the new layout


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "untied"])
def test_compiled_batch_one_decode_gives_the_eager_ids(hf_checkpoint, variant):
    # batch one: the compiled step's products are one row each (opt_torch.linear.one_row_product)
    folder, _ = hf_checkpoint(variant)
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    ids = IDS[:1, MASK[0].argmax() :]  # the first row without its left padding
    compiled = model.generate(ids, compile=True, **OPTIONS)
    assert torch.equal(compiled, model.generate(ids, **OPTIONS))


def test_compiled_decode_reuses_its_program_within_a_cache_length_bucket(hf_checkpoint):
    from torch._dynamo.utils import counters

    from opt_torch.generation import COMPILED_CACHE_MULTIPLE

    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    options = dict(OPTIONS, max_new_tokens=3)
    model.generate(IDS, attention_mask=MASK, compile=True, **options)
    graphs = counters["stats"]["unique_graphs"]
    longest = min(COMPILED_CACHE_MULTIPLE, model.config.max_position_embeddings) - IDS.shape[1]
    for new_tokens in (5, longest):  # other lengths, the same bucket
        options["max_new_tokens"] = new_tokens
        compiled = model.generate(IDS, attention_mask=MASK, compile=True, **options)
        assert torch.equal(compiled, model.generate(IDS, attention_mask=MASK, **options))
        for strategy in (dict(num_beams=2), dict(penalty_alpha=0.6, top_k=3)):
            ids = model.generate(IDS, attention_mask=MASK, compile=True, **options, **strategy)
            assert torch.equal(ids, model.generate(IDS, attention_mask=MASK, **options, **strategy))
    assert counters["stats"]["unique_graphs"] == graphs + 2  # the two other strategies' batch sizes, once each


def test_the_compiled_step_traces_one_layer_and_stamps_it_out(hf_checkpoint):
    """The compiled step runs every decoder layer as one nested compile region (opt_torch.modeling.compiled_layer):
    one traced layer graph, called once per layer. The file-mapped weights that enter it get storages of their own
    (a region refuses inputs sharing one), the same Parameter objects with the same values."""
    from opt_torch.generation import decode_step, own_storage_for_layers

    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    layers = model.model.decoder.layers
    parameters = {name: (p, p.detach().clone()) for name, p in layers.named_parameters()}
    assert len({p.untyped_storage().data_ptr() for p, _ in parameters.values()}) == 1  # one mapping of the file
    own_storage_for_layers(model)
    assert len({p.untyped_storage().data_ptr() for p, _ in parameters.values()}) == len(parameters)
    for name, p in layers.named_parameters():
        assert p is parameters[name][0] and torch.equal(p, parameters[name][1])

    graphs = []

    def capture(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    cache = model.init_cache(1, 8)

    def step(*args):  # a code object of its own: dynamo's recompile limit counts compiles per code object
        return decode_step(*args)

    step = torch.compile(step, backend=capture, fullgraph=True)
    tokens, mask, slot = IDS[:1, :1], torch.ones(1, 8, dtype=torch.long), torch.tensor([0])
    with torch.no_grad():
        logits, _ = step(model, tokens, mask, cache, slot)
        expected, _ = decode_step(model, tokens, mask, model.init_cache(1, 8), slot)
    calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == model.config.num_hidden_layers
    assert len({n.args[0].target for n in calls}) == 1  # one layer graph, stamped out
    torch.testing.assert_close(logits, expected, atol=FP32_ATOL, rtol=0)


def test_a_users_own_compile_of_the_decoder_inlines_the_layers(hf_checkpoint):
    """Regions are generate's alone (`layer_regions=True` in its step): a user's torch.compile of the decoder over a
    static cache still compiles a model whose weights share the file's mapping, with every layer inlined."""
    folder, _ = hf_checkpoint("pre_ln")
    model = opt_torch.OPTForCausalLM.from_pretrained(folder)
    graphs = []

    def capture(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    decoder = torch.compile(model.model.decoder, backend=capture, fullgraph=True)
    tokens, mask, slot = IDS[:1, :1], torch.ones(1, 8, dtype=torch.long), torch.tensor([0])
    with torch.no_grad():
        decoder(tokens, mask, past_key_values=model.init_cache(1, 8), use_cache=True, cache_position=slot)
    assert not [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len({p.untyped_storage().data_ptr() for p in model.model.decoder.layers.parameters()}) == 1


def test_a_compiled_one_row_product_is_fused_not_an_mm():
    from torch._inductor.utils import run_and_get_code

    layer = torch_linear.Linear(64, 48)
    compiled = torch.compile(layer, dynamic=False)
    with torch.no_grad():
        x = torch.randn(1, 1, 64)
        y, code = run_and_get_code(compiled, x)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=FP32_ATOL)
        assert "mm(" not in "".join(code)  # Inductor's own vectorized loop, not the extern (MKL) product
        _, code = run_and_get_code(compiled, torch.randn(3, 64))  # several rows: the mm, as F.linear
        assert "mm(" in "".join(code)
    _, code = run_and_get_code(compiled, x)  # with autograd (training): F.linear as written
    assert "mm(" in "".join(code)


def test_a_compiled_one_row_int8_product_is_fused_and_equals_the_dequantized_weights():
    from torch._inductor.utils import run_and_get_code

    from opt_torch.quantization import Int8Linear

    weight = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48), weight, torch.rand(48) / 100)
    compiled = torch.compile(layer, dynamic=False)
    with torch.no_grad():
        x = torch.randn(1, 64)
        y, code = run_and_get_code(compiled, x)
        expected = torch.nn.functional.linear(x, layer.dequantized(), layer.bias)
        torch.testing.assert_close(y, expected, rtol=0, atol=FP32_ATOL)
        assert "mm(" not in "".join(code) and "int8_pack_mm" not in "".join(code)
        _, code = run_and_get_code(compiled, torch.randn(3, 64))  # several rows: the packed op
        assert "int8_pack_mm" in "".join(code)
