"""The chunked loss is the model's own loss: same value and same gradients, without the full logits.

cd /work/main && python -m pytest tests/test_loss.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch

import gpt2ft.loss
from gpt2ft.loss import core_model, token_nll_sum, use_chunked_loss


@pytest.fixture
def pair(tiny_model):
    """The fixture model twice, dropout off: one plain, one with the chunked loss."""
    plain = copy.deepcopy(tiny_model).eval()
    chunked = use_chunked_loss(copy.deepcopy(tiny_model).eval())
    return plain, chunked


def batch_with_ignored_positions(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 23), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100  # context only
    labels[2, 15:] = -100  # a padded tail
    return {"input_ids": ids, "labels": labels}


def test_loss_and_every_gradient_equal_the_models_own(pair, monkeypatch):
    plain, chunked = pair
    monkeypatch.setattr(gpt2ft.loss, "LOSS_CHUNK", 10)  # 69 positions: several chunks, the last one partial
    batch = batch_with_ignored_positions(plain.config.vocab_size)
    expected = plain(**batch, use_cache=False).loss
    got = chunked(**batch).loss
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert got.grad_fn is not None and chunked(**batch).logits is None  # no logits were made
    expected.backward()
    got.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_given_token_count_divides_the_sum_as_transformers_does(pair):
    plain, chunked = pair
    batch = batch_with_ignored_positions(plain.config.vocab_size, seed=1)
    count = torch.tensor(200)  # e.g. the whole optimiser step's targets under gradient accumulation
    expected = plain(**batch, use_cache=False, num_items_in_batch=count).loss
    torch.testing.assert_close(chunked(**batch, num_items_in_batch=count).loss, expected, atol=1e-6, rtol=1e-6)


def test_without_labels_the_model_is_unchanged(pair):
    plain, chunked = pair
    ids = batch_with_ignored_positions(plain.config.vocab_size)["input_ids"]
    torch.testing.assert_close(
        chunked(input_ids=ids, use_cache=False).logits, plain(input_ids=ids, use_cache=False).logits
    )


def test_frozen_output_embedding_gets_no_gradient_buffer(tiny_model):
    """Under LoRA the embedding is frozen: only the hidden states' gradient is computed."""
    model = use_chunked_loss(copy.deepcopy(tiny_model).eval())
    model.lm_head.weight.requires_grad_(False)
    batch = batch_with_ignored_positions(model.config.vocab_size)
    model(**batch).loss.backward()
    assert model.lm_head.weight.grad is None
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_under_bf16_autocast_it_matches_the_models_own_bf16_loss(pair):
    plain, chunked = pair
    batch = batch_with_ignored_positions(plain.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(**batch, use_cache=False).loss
        got = chunked(**batch).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), atol=2e-2, rtol=0)


def test_no_grad_scoring_sums_the_same(pair):
    plain, _ = pair
    batch = batch_with_ignored_positions(plain.config.vocab_size)
    with torch.no_grad():
        hidden = plain.transformer(input_ids=batch["input_ids"]).last_hidden_state
        total, count = token_nll_sum(hidden, plain.lm_head.weight, batch["labels"], chunk=5)
        expected = plain(**batch, use_cache=False).loss
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, expected, atol=1e-6, rtol=1e-6)


def test_the_saved_model_is_a_plain_gpt2(pair, tmp_path):
    """Only the instance's forward is replaced: the saved folder loads as plain GPT-2, logits and all."""
    from transformers import AutoModelForCausalLM

    _, chunked = pair
    chunked.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "GPT2LMHeadModel" and "forward" not in vars(loaded)
    ids = torch.tensor([[1, 2, 3]])
    assert loaded(input_ids=ids, labels=ids).logits.shape == (1, 3, loaded.config.vocab_size)
    assert core_model(chunked) is chunked


def test_under_fp16_the_gradients_wait_for_the_loss_scale_and_match_the_models_own(pair, monkeypatch):
    """fp16 (a T4): the gradients are made in the backward pass, from the scaled loss, as the model's own are."""
    plain, chunked = pair
    monkeypatch.setattr(gpt2ft.loss, "LOSS_CHUNK", 16)
    batch = batch_with_ignored_positions(plain.config.vocab_size, seed=2)
    scale = 1024.0  # what a GradScaler multiplies the loss by
    with torch.autocast("cpu", dtype=torch.float16):
        expected = plain(**batch, use_cache=False).loss
        got = chunked(**batch).loss
    torch.testing.assert_close(got, expected.float(), atol=2e-2, rtol=0)
    (expected.float() * scale).backward()
    (got * scale).backward()
    head_plain, head_chunked = plain.lm_head.weight.grad, chunked.lm_head.weight.grad
    assert torch.isfinite(head_chunked).all()
    assert torch.nn.functional.cosine_similarity(head_chunked.flatten(), head_plain.flatten(), dim=0) > 0.99
    assert abs(float(head_chunked.norm() / head_plain.norm()) - 1) < 0.05  # the scale was applied, once
    first_plain, first_chunked = (
        plain.transformer.h[0].attn.c_attn.weight.grad,
        chunked.transformer.h[0].attn.c_attn.weight.grad,
    )
    assert torch.nn.functional.cosine_similarity(first_chunked.flatten(), first_plain.flatten(), dim=0) > 0.99
