"""Every Python block of README.md, then of docs/ops.md, runs as written, in order, in one namespace, on a tiny BERT
classifier (and a tiny Llama for the causal-LM block).

The test brings only what the README leaves to the reader (`model`, `loader`, `optimizer`, ...), each
block's own needs listed below next to a phrase the block must contain, so that a block added, removed or
reordered in the README fails here until its needs are stated.
"""
import os
import re
import warnings

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
DOCUMENTS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "ops.md")]
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def python_blocks():
    """(document, code) of each block, the code led by blank lines so that a traceback names its line there."""
    blocks = []
    for document in DOCUMENTS:
        with open(document) as handle:
            text = handle.read()
        blocks += [(document, "\n" * text.count("\n", 0, found.start(1)) + found.group(1))
                   for found in re.finditer(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)]
    return blocks


def tiny_bert(layers):
    torch.manual_seed(layers)
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertForSequenceClassification(config).eval()


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 60, (4, 8), generator=generator),
             "attention_mask": torch.ones(4, 8, dtype=torch.int64),
             "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(count)]


def probing(namespace):
    model = tiny_bert(2)
    namespace.update(model=model, loader=batches(3), optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))


def choosing(namespace):
    namespace.update(large_model=tiny_bert(3))


def algorithm(namespace):
    namespace.update(small_model=tiny_bert(2), large_model=tiny_bert(3), batches=batches(4, seed=1), horizon=20)


def tiny_llama(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config)


def causal_lm(namespace):
    generator = torch.Generator().manual_seed(2)
    namespace.update(causal_lm=tiny_llama(0), fresh_causal_lm=tiny_llama(1),
                     token_batches=[torch.randint(0, 60, (4, 12), generator=generator) for _ in range(4)])


def perturbation(namespace):
    model, batch = namespace["model"], namespace["loader"][0]
    params = [p for p in model.parameters() if p.requires_grad][:5]
    model.zero_grad()
    namespace["loss_fn"](model, batch).backward()
    namespace.update(params=params, batch=batch, eta=1e-3, device="cpu", losses=torch.empty(4))


# (a phrase the block contains, what the reader brings to it), in the documents' order
NEEDS = [("adapeft.Prober(model, groups, loss_fn", probing),
         ("adapeft.select(prober", choosing),
         ("AdaPEFT(budget=", algorithm),
         ("lora_targets(causal_lm)", causal_lm),
         ("adapeft.GroupPerturbation(", perturbation)]


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert [phrase for phrase, _ in NEEDS] == [next((p for p, _ in NEEDS if p in block), block[:60])
                                               for _, block in blocks], "the documents' blocks changed: update NEEDS"
    monkeypatch.chdir(tmp_path)  # the blocks save files
    namespace = {}
    for (document, block), (_, bring) in zip(blocks, NEEDS):
        bring(namespace)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(block, document, "exec"), namespace)
    assert namespace["prober"].history, "the probing block never probed"
    assert (tmp_path / "selection.json").exists()
    assert namespace["tuned"].peft_config["default"].target_modules  # peft adapted what the probe chose
    assert all(torch.isfinite(namespace["losses"]))
