"""The real SmolLM2-135M-Instruct (GGUF Q4_1) against transformers reading the same file."""

import os

import numpy as np
import pytest
import torch

from sunjax.generate import generate
from sunjax.steps import forward
from sunjax.tokenizer import chat_prompt, eos_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path),
        gguf_file=os.path.basename(smollm2_path),
        dtype=torch.float32,
    ).eval()


def test_logits_and_greedy_tokens_match_transformers(smollm2, hf_smollm2):
    cfg, params, tok = smollm2
    ids = chat_prompt(tok, "Write one sentence about the sea.")
    ours = np.asarray(forward(cfg, params, np.array([ids])))
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)

    got = generate(cfg, params, [ids], max_new_tokens=32).tokens[0]
    with torch.no_grad():
        # An explicit attention mask: the chat prompt contains <|im_end|>, which is also the pad
        # id, and generate() would otherwise mask those prompt tokens out.
        want = hf_smollm2.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )[0, len(ids) :].tolist()
    assert got == want


def test_answers_the_capital_of_france(smollm2):
    cfg, params, tok = smollm2
    ids = chat_prompt(tok, "What is the capital of France?")
    out = generate(cfg, params, [ids], max_new_tokens=24, eos_ids=eos_ids(tok))
    assert "Paris" in tok.decode(out.tokens[0])
    assert out.finish_reason == ["stop"]
