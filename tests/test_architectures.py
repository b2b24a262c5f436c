"""MLP neurons of every supported architecture, on tiny random models, against a hand computation.

For each architecture the test names, by hand, the module whose input is the MLP's input and the
formula of its neurons (the activation before the output projection); the hooks under test find
the layer through the model's decoder and read the output projection's input. The two must agree.
Mixture-of-experts models are refused from config.json alone, before any weight is built.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from neuronlens.models import SubjectError
from neuronlens.subject.hooks import hook_point, hook_point_from_config, n_neurons, neuron_hooks

SMALL = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_key_value_heads=2, head_dim=8)


def _gated(mlp, x):
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def _phi3(mlp, x):
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    return up * mlp.activation_fn(gate)


# model type: (config kwargs, the module whose input the MLP reads, by hand; its neurons, by hand)
ARCHS = {
    "gpt2": (dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64),
             "transformer.h.{}.mlp", lambda m, x: m.act(m.c_fc(x))),
    "llama": (SMALL | LLAMA_LIKE, "model.layers.{}.mlp", _gated),
    "mistral": (SMALL | LLAMA_LIKE, "model.layers.{}.mlp", _gated),
    "qwen2": (SMALL | LLAMA_LIKE, "model.layers.{}.mlp", _gated),
    "phi3": (SMALL | dict(hidden_size=32, intermediate_size=48, num_key_value_heads=4, pad_token_id=0),
             "model.layers.{}.mlp", _phi3),
    "gemma": (SMALL | LLAMA_LIKE, "model.layers.{}.mlp", _gated),
    "gemma2": (SMALL | LLAMA_LIKE, "model.layers.{}.mlp", _gated),
    "gemma3_text": (SMALL | LLAMA_LIKE, "model.layers.{}.mlp", _gated),
    "starcoder2": (SMALL | dict(hidden_size=32, intermediate_size=48, num_key_value_heads=2),
                   "model.layers.{}.mlp", lambda m, x: m.act(m.c_fc(x))),
    "gpt_neox": (SMALL | dict(hidden_size=32, intermediate_size=48),
                 "gpt_neox.layers.{}.mlp", lambda m, x: m.act(m.dense_h_to_4h(x))),
    "phi": (SMALL | dict(hidden_size=32, intermediate_size=48),
            "model.layers.{}.mlp", lambda m, x: m.activation_fn(m.fc1(x))),
    "opt": (SMALL | dict(hidden_size=32, ffn_dim=48, word_embed_proj_dim=32),
            "model.decoder.layers.{}", lambda layer, x: layer.activation_fn(layer.fc1(x))),
    "gptj": (dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64, rotary_dim=4),
             "transformer.h.{}.mlp", lambda m, x: m.act(m.fc_in(x))),
}


def _tiny(model_type: str):
    kwargs, _, _ = ARCHS[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    return config, AutoModelForCausalLM.from_config(config).eval()


def _input_of(model, path: str, layer: int, ids: torch.Tensor, module_input_of=None):
    """The input of module ``path`` at ``layer`` during a forward pass (OPT: of its fc1)."""
    module = model.get_submodule(path.format(layer))
    target = module.fc1 if module_input_of == "fc1" else module
    seen = {}
    handle = target.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach()))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return module, seen["x"]


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_neurons_are_the_input_of_the_mlp_output_projection(model_type):
    config, model = _tiny(model_type)
    _, path, manual = ARCHS[model_type]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    layer = 1
    assert hook_point_from_config(config, layer) == hook_point(model, layer)   # before the weights
    got = {}
    with torch.no_grad(), neuron_hooks(model, [layer], lambda l, a: got.setdefault(l, a.detach().clone())):
        model(input_ids=ids, use_cache=False)
    with torch.no_grad():
        module, x = _input_of(model, path, layer, ids, "fc1" if model_type == "opt" else None)
        expected = manual(module, x)
    assert got[layer].shape[-1] == n_neurons(model) == expected.shape[-1]
    torch.testing.assert_close(got[layer].reshape(expected.shape), expected)
    assert expected.abs().max() > 0


def test_a_text_model_inside_a_multimodal_one_is_found():
    """Gemma 3 from 4B up: the layers sit under model.language_model, not model.layers."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(SMALL | LLAMA_LIKE),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    point = hook_point(model, 1)
    assert point.module == "model.language_model.layers.1.mlp.down_proj" and point.kind == "input"
    assert n_neurons(model) == 48


@pytest.mark.parametrize("model_type, kwargs", [
    ("mixtral", SMALL | LLAMA_LIKE | dict(num_local_experts=4, num_experts_per_tok=2)),
    ("qwen2_moe", SMALL | LLAMA_LIKE | dict(num_experts=4, moe_intermediate_size=16,
                                            shared_expert_intermediate_size=16)),
])
def test_mixture_of_experts_is_refused_from_the_config(model_type, kwargs, monkeypatch):
    config = AutoConfig.for_model(model_type, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(SubjectError, match=r"mixture of experts \(4 experts per layer") as info:
        hook_point_from_config(config, 0)
    assert "\n" not in str(info.value)


FINAL_NORM = {"gpt2": "transformer.ln_f", "gptj": "transformer.ln_f", "opt": "model.decoder.final_layer_norm",
              "gpt_neox": "gpt_neox.final_layer_norm", "phi": "model.final_layernorm"}


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_output_logits_are_the_direction_through_norm_and_unembedding(model_type, tiny_tokenizer):
    """Each neuron's promoted and suppressed tokens: its output direction (read here by running
    the projection on a one-hot input, whatever the weight's layout), scaled by the final norm's
    weight (randomised here, 1 + weight for Gemma), through the unembedding."""
    from neuronlens.subject.logits import direction_logits, output_direction_weights

    _, model = _tiny(model_type)
    norm = model.get_submodule(FINAL_NORM.get(model_type, "model.norm"))
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(2)) + 0.5)
    scale = norm.weight + 1 if model_type.startswith("gemma") else norm.weight
    point = hook_point(model, 1).module
    proj = model.get_submodule(point)
    width = n_neurons(model)
    indices = [0, 5, width - 1]
    got = direction_logits(model, tiny_tokenizer, output_direction_weights(model, point)[indices], indices)
    with torch.no_grad():
        for i in (0, 5, width - 1):
            one_hot = torch.zeros(1, width)
            one_hot[0, i] = 1.0
            direction = (proj(one_hot) - proj(torch.zeros(1, width)))[0]
            logits = model.get_output_embeddings().weight @ (scale * direction)
            top = logits.topk(10)
            assert [t for t, _ in got[i]["promoted"]] == [tiny_tokenizer.decode([int(t)]) for t in top.indices]
            assert [v for _, v in got[i]["promoted"]] == pytest.approx(top.values.tolist(), abs=1e-3)
            low = (-logits).topk(10)
            assert [v for _, v in got[i]["suppressed"]] == pytest.approx((-low.values).tolist(), abs=1e-3)
