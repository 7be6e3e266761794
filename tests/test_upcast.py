"""adapeft.upcast: a 16-bit model's forward pass in float32, equal bit for bit to the model stored in float32."""
import copy
import warnings

import pytest
import torch

from adapeft.upcast import float32_compute

transformers = pytest.importorskip("transformers")


def tiny(kind, attention):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "llama":
            config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                              tie_word_embeddings=True)
        elif kind == "gpt2":
            config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=32,
                                             bos_token_id=0, eos_token_id=0)
        else:
            config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, num_labels=3)
        config._attn_implementation = attention
        model = transformers.BertForSequenceClassification(config) if kind == "bert" else \
            transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_model_computes_as_its_float32_copy(kind, attention, dtype):
    model = tiny(kind, attention).to(dtype)
    stored = {name: p.detach().clone() for name, p in model.named_parameters()}
    as_float32 = copy.deepcopy(model).float()
    ids = torch.randint(0, 60, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        native = model(input_ids=ids, attention_mask=mask).logits
        with float32_compute():
            raised = model(input_ids=ids, attention_mask=mask).logits
        want = as_float32(input_ids=ids, attention_mask=mask).logits
    assert raised.dtype == torch.float32 and native.dtype == dtype
    assert torch.equal(raised, want)
    assert not torch.equal(native.float(), want)  # the 16-bit forward rounds, which is what this is for
    for name, p in model.named_parameters():
        assert p.dtype == dtype and torch.equal(p, stored[name]), name


def test_gradients_reach_the_sixteen_bit_weights_and_in_place_ops_act_on_them():
    layer = torch.nn.Linear(4, 3).to(torch.bfloat16)
    x = torch.randn(2, 4)
    kept = torch.zeros(3, dtype=torch.bfloat16)
    with float32_compute():
        out = layer(x)
        out.sum().backward()
        kept.add_(1.5)  # in place on a 16-bit tensor: that tensor changes, in its own dtype
        made = torch.zeros(2, dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and layer.weight.grad.dtype == torch.bfloat16
    assert torch.equal(layer.weight.grad, torch.ones(3, 1, dtype=torch.bfloat16) * x.sum(0).to(torch.bfloat16))
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert made.dtype == torch.float32  # a 16-bit dtype asked for is float32 inside


def test_disabled_is_a_no_op():
    x = torch.ones(2, dtype=torch.bfloat16)
    with float32_compute(enabled=False):
        assert (x * 2).dtype == torch.bfloat16
