"""Per-row exact soups on a tiny llama with random LoRA experts: every row of a mixed batch equals the merged
exact soup of its own weights, and gets what it gets alone."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_experts, build_tiny_tokenizer

from personalign.errors import ConfigError
from personalign.generation import ModelStep, SamplingConfig, decode, encode_batch
from personalign.soups import RowSoups, SoupStep

NAMES = ["P1A", "P2B", "P3A"]
WEIGHTS = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.7, 0.3, 0.0], [1.0, -0.5, 0.2]])
PROMPTS = ["Explain photosynthesis to me.", "Hi.", "What is the capital of France? Tell me."]


@pytest.fixture(scope="module")
def setup():
    tok = build_tiny_tokenizer()
    return tok, build_tiny_experts(tok, NAMES)


def merged_soup(peft_model, weights):
    """The exact soup of ``weights`` merged into a copy of the base: the reference."""
    from personalign.adapters import adapter_from_model, with_adapters
    from personalign.merging import merge_adapters

    adapters = [adapter_from_model(peft_model, n) for n in NAMES]
    soup, _ = merge_adapters(adapters, weights.tolist(), method="exact")
    base = copy.deepcopy(peft_model.get_base_model())
    return with_adapters(base, {"default": soup}).merge_and_unload().eval()


def test_each_row_of_a_mixed_batch_equals_its_merged_exact_soup(setup):
    tok, model = setup
    soups = RowSoups(model, NAMES)
    ids, mask = encode_batch(tok, PROMPTS)
    with torch.no_grad(), soups.applied(WEIGHTS):
        got = model(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
    for row in range(len(PROMPTS)):
        ref = merged_soup(model, WEIGHTS[row])
        with torch.no_grad():
            want = ref(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        real = mask[row].bool()
        assert torch.allclose(got[row][real], want[0][real], atol=1e-5), row


def test_decoding_a_mixed_batch_gives_each_row_what_its_merged_soup_gives(setup):
    tok, model = setup
    soups = RowSoups(model, NAMES)
    ids, mask = encode_batch(tok, PROMPTS)
    s = SamplingConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    together = decode(SoupStep(soups, WEIGHTS), ids, mask, s, eos=[tok.eos_token_id], pad=tok.pad_token_id,
                      generator=None)
    for row in range(len(PROMPTS)):
        rid, rmask = encode_batch(tok, PROMPTS[row:row + 1])
        alone = decode(ModelStep(merged_soup(model, WEIGHTS[row])), rid, rmask, s, eos=[tok.eos_token_id],
                       pad=tok.pad_token_id, generator=None)
        n = int(alone.mask.sum())
        assert together.tokens[row, :n].tolist() == alone.tokens[0, :n].tolist(), row


def test_the_model_is_unchanged_outside_the_block_and_weight_one_is_that_expert(setup):
    tok, model = setup
    soups = RowSoups(model, NAMES)
    ids, mask = encode_batch(tok, PROMPTS[:1])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), soups.applied(torch.zeros(1, 3)):
        zero = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(zero, base, atol=1e-6)  # all weights zero: the base model
    model.set_adapter("P2B")
    with torch.no_grad():
        expert = model(input_ids=ids, attention_mask=mask).logits
        with soups.applied(torch.tensor([[0.0, 1.0, 0.0]])):
            one = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(one, expert, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules() if hasattr(m, "lora_A"))
    model.set_adapter(NAMES[0])


def test_bad_weights_and_adapters_are_refused(setup):
    tok, model = setup
    soups = RowSoups(model, NAMES)
    with pytest.raises(ConfigError, match=r"expected \(B, 3\)"), soups.applied(torch.ones(2, 2)):
        pass
    with pytest.raises(ConfigError, match="not loaded"):
        RowSoups(model, ["P1A", "nope"])
    ids, mask = encode_batch(tok, PROMPTS[:2])
    with pytest.raises(ConfigError, match="2 soup weight rows"):
        decode(SoupStep(soups, torch.ones(2, 3)), ids[:1], mask[:1], SamplingConfig(max_new_tokens=2), eos=[0],
               pad=0, generator=None)
