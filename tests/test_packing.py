"""Packing is exact, in every model family gpt2ft trains (GPT-2, Llama, Qwen2, Qwen3, Mistral): a packed batch gives
every token the same loss as its dialogue scored alone, and no token attends across a dialogue boundary. Padding is
exact too, and the reported loss is token-weighted.

    cd /work/main && python -m pytest tests/test_packing.py -q

`DialogueCollator(tok, "pack")` concatenates the dialogues of a batch into a few rows (of ~`row_tokens` tokens,
each topped up with a padding segment) whose `position_ids` restart at 0 for each dialogue, and gives every batch a
4-D attention mask: causal and block-diagonal, one block per dialogue (padding a block of its own). If that mask
ever let one dialogue see another (a collator bug, a transformers change in how a 4-D mask is used, a KV cache left
on), training would silently let dialogue B condition on dialogue A and the loss would be wrong; these tests catch
that.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import EXCHANGES, FAMILY_CONFIGS, build_tiny_family_dir

from gpt2ft.data import IGNORE_INDEX, DialogueCollator, dialogs_dataset, tokenize_dialogs
from gpt2ft.evaluation import evaluate_loss

ATOL = 1e-5


def varied_dialogs() -> list[list[str]]:
    """Five dialogues of clearly different lengths (1 to 9 exchanges), so padding and packing both matter."""
    rng = random.Random(7)
    dialogs = []
    for exchanges in (1, 4, 2, 9, 3):
        turns: list[str] = []
        for _ in range(exchanges):
            turns.extend(rng.choice(EXCHANGES))
        dialogs.append(turns)
    return dialogs


# Every family gpt2ft trains: GPT-2 and, in their own ChatML templates, the Llama-style ones (FAMILY_CONFIGS).
FAMILIES = ("gpt2", *FAMILY_CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory, tiny_model_dir):
    if request.param == "gpt2":
        return tiny_model_dir
    return build_tiny_family_dir(tmp_path_factory.mktemp(f"packing_{request.param}"), request.param)


@pytest.fixture
def tokenizer(model_dir):
    from gpt2ft.modeling import load_tokenizer

    return load_tokenizer(str(model_dir))


@pytest.fixture
def rows(tokenizer):
    rows = tokenize_dialogs(dialogs_dataset(varied_dialogs()), tokenizer, max_length=256)
    assert len(set(rows["length"])) == len(rows), "the test needs rows of different lengths"
    assert len(rows) == 5  # one row per dialogue: none is longer than the window
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]


@pytest.fixture
def model(model_dir):
    from gpt2ft.modeling import load_model

    return load_model(str(model_dir)).eval()  # dropout off: the comparison must be deterministic


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token NLL (0 where there is no target) and the target mask, both (batch, seq-1)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    return nll, labels != IGNORE_INDEX


def alone(model, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of one row scored by itself, unpadded (the reference)."""
    batch = {"input_ids": torch.tensor([row["input_ids"]]), "labels": torch.tensor([row["labels"]])}
    nll, mask = token_nll(model, batch)
    return nll[0], mask[0]


def segments(batch: dict[str, torch.Tensor]):
    """(row, start, end) of every segment of a batch, read off its attention mask: a position starts a segment when
    it may not attend to the position before it."""
    mask = batch["attention_mask"][:, 0]
    for r in range(mask.shape[0]):
        starts = [0] + [i for i in range(1, mask.shape[1]) if not mask[r, i, i - 1]] + [mask.shape[1]]
        yield from ((r, start, end) for start, end in zip(starts, starts[1:]))


def test_padded_batch_per_token_losses_match_unpadded(model, rows, tokenizer):
    reference = [alone(model, row) for row in rows]
    padded = DialogueCollator(tokenizer, "pad")(rows)
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] > max(
        len(r["input_ids"]) for r in rows
    )
    nll, mask = token_nll(model, padded)
    for index, (row, (ref_nll, ref_mask)) in enumerate(zip(rows, reference)):
        n = len(row["input_ids"])
        # Row `index`, its first n-1 prediction positions; everything after is padding with no target.
        assert torch.equal(mask[index, : n - 1], ref_mask)
        assert not mask[index, n - 1 :].any()
        torch.testing.assert_close(nll[index, : n - 1], ref_nll, atol=ATOL, rtol=0)
    ref_sum = sum(n[m].double().sum() for n, m in reference)  # float64: ~200 terms of ~6 each
    assert int(mask.sum()) == sum(int(m.sum()) for _, m in reference)
    torch.testing.assert_close(nll[mask].double().sum(), ref_sum, atol=1e-4, rtol=0)


# One row for the whole batch (row_tokens past the batch's size) and several balanced rows of ~64 tokens, each
# topped up with a padding segment: both must score every token exactly as the dialogue alone.
@pytest.mark.parametrize("row_tokens", [10_000, 64])
def test_packed_per_token_losses_match_unpadded(model, rows, tokenizer, row_tokens):
    reference = {tuple(row["input_ids"]): alone(model, row) for row in rows}
    packed = DialogueCollator(tokenizer, "pack", row_tokens=row_tokens)(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    if row_tokens > total:
        assert packed["input_ids"].shape[0] == 1
    else:
        assert packed["input_ids"].shape[0] > 1  # several rows, each topped up with padding
    nll, mask = token_nll(model, packed)
    found, padding = 0, 0
    for r, start, end in segments(packed):
        key = tuple(packed["input_ids"][r, start:end].tolist())
        # Position start - 1 (the previous segment's last token predicting this one's first) never has a target.
        if start > 0:
            assert not mask[r, start - 1]
        if key not in reference:  # the padding segment at the end of a row: no targets
            assert end == packed["input_ids"].shape[1] and not mask[r, start : end - 1].any()
            padding += end - start
            continue
        ref_nll, ref_mask = reference[key]
        assert torch.equal(mask[r, start : end - 1], ref_mask)
        torch.testing.assert_close(nll[r, start : end - 1], ref_nll, atol=ATOL, rtol=0)
        found += 1
    assert found == len(rows)
    assert packed["input_ids"].numel() == total + padding

    # Sums and counts agree, so the mean loss is the same whichever way the batch is built ...
    ref_sum = sum(n[m].double().sum() for n, m in reference.values())
    ref_count = sum(int(m.sum()) for _, m in reference.values())
    assert int(mask.sum()) == ref_count
    torch.testing.assert_close(nll[mask].double().sum(), ref_sum, atol=1e-4, rtol=0)
    # ... and the model's own loss (what the Trainer optimises) on the packed batch is that token mean.
    with torch.no_grad():
        model_loss = model(**packed, use_cache=False).loss
    torch.testing.assert_close(model_loss.double(), ref_sum / ref_count, atol=ATOL, rtol=0)


def test_packed_attention_does_not_cross_dialogue_boundaries(model, rows, tokenizer):
    collate = DialogueCollator(tokenizer, "pack", row_tokens=10_000)  # both dialogues in one row
    pair = [rows[1], rows[3]]
    batch = collate(pair)
    assert batch["input_ids"].shape[0] == 1
    (_, e_start, e_end), (_, l_start, l_end) = sorted(segments(batch), key=lambda seg: seg[1])[:2]
    early = next(r for r in pair if r["input_ids"] == batch["input_ids"][0, e_start:e_end].tolist())
    late = next(r for r in pair if r is not early)
    assert batch["input_ids"][0, l_start:l_end].tolist() == late["input_ids"]

    # Change every token of the dialogue that comes first in the row (same length, labels follow the inputs).
    vocab = len(tokenizer)
    changed_ids = [early["input_ids"][0]] + [(t + 17) % vocab for t in early["input_ids"][1:]]
    changed = {"input_ids": changed_ids, "labels": [IGNORE_INDEX] + changed_ids[1:]}
    edited_batch = collate([changed, late])
    assert edited_batch["input_ids"][0, l_start:l_end].tolist() == late["input_ids"]  # same layout

    def logits(batch, keys=("input_ids", "position_ids", "attention_mask")):
        with torch.no_grad():
            return model(**{k: batch[k] for k in keys}, use_cache=False).logits[0]

    original, edited = logits(batch), logits(edited_batch)
    assert not torch.allclose(original[e_start:e_end], edited[e_start:e_end])  # the edit is real
    torch.testing.assert_close(edited[l_start:l_end], original[l_start:l_end], atol=ATOL, rtol=0)

    # Control: without the mask (and position_ids) the row is one causal sequence and the edit does leak into the
    # later dialogue, so the check above would catch a mask that is not block-diagonal.
    plain, plain_edited = logits(batch, ("input_ids",)), logits(edited_batch, ("input_ids",))
    assert not torch.allclose(plain[l_start:l_end], plain_edited[l_start:l_end], atol=1e-3)


@pytest.mark.parametrize("batching", ["pad", "pack"])
def test_evaluate_loss_is_token_weighted(model, rows, tokenizer, batching):
    """evaluate_loss over padded or packed batches equals the token-weighted mean of per-sequence losses."""
    total, count, per_sequence = 0.0, 0, []
    with torch.no_grad():
        for row in rows:
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
            n = sum(label != IGNORE_INDEX for label in row["labels"][1:])
            total += float(loss) * n
            count += n
            per_sequence.append(float(loss))
    # Batches of 2 leave a last batch of 1, so a mean of batch means would weight the rows wrongly.
    result = evaluate_loss(model, rows, DialogueCollator(tokenizer, batching), batch_size=2)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, abs=ATOL)
    batch_means = []
    for start in range(0, len(rows), 2):
        chunk = rows[start : start + 2]
        with torch.no_grad():
            batch_means.append(float(model(**DialogueCollator(tokenizer, batching)(chunk), use_cache=False).loss))
    # The naive alternatives really are different here, so the equality above is a meaningful check.
    assert abs(sum(batch_means) / len(batch_means) - total / count) > 1e-4
    assert abs(sum(per_sequence) / len(per_sequence) - total / count) > 1e-4


def test_the_trainers_own_forward_passes_keep_packed_dialogues_apart(
    model, rows, tokenizer, model_dir, dailydialog_dir, run_dirs
):
    """Through the Trainer gpt2ft builds, not a hand-made model call: its compute_loss (training) and the library's
    own prediction_step (which passes no use_cache) both give the packed batch the unpacked token-weighted loss."""
    from conftest import config_for

    from gpt2ft.runs import LoadedModel
    from gpt2ft.training import build_trainer, plan_run

    plan = plan_run(config_for(model_dir, dailydialog_dir, run_dirs, "--max-steps", "1"))
    rows_by_split = {"train": rows, "validation": rows}
    trainer = build_trainer(plan, LoadedModel(model, tokenizer, {}), rows_by_split, settings={})
    reference = [alone(model, row) for row in rows]
    expected = sum(n[m].double().sum() for n, m in reference) / sum(int(m.sum()) for _, m in reference)
    packed = DialogueCollator(tokenizer, "pack", row_tokens=10_000)(rows)
    assert packed["input_ids"].shape[0] == 1 and packed["attention_mask"].dim() == 4  # all five dialogues in one row
    model.eval()
    with torch.no_grad():
        training_loss = trainer.compute_loss(model, dict(packed))
    prediction_loss, _, _ = trainer.prediction_step(model, dict(packed), prediction_loss_only=True)
    torch.testing.assert_close(training_loss.double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(prediction_loss.double(), expected, atol=ATOL, rtol=0)


def test_evaluation_keeps_packed_dialogues_apart_even_when_the_model_config_wants_a_cache(model, rows, tokenizer):
    model.config.use_cache = True  # as a model fresh from from_pretrained has it
    reference = [alone(model, row) for row in rows]
    expected = float(sum(n[m].double().sum() for n, m in reference) / sum(int(m.sum()) for _, m in reference))
    collator = DialogueCollator(tokenizer, "pack", row_tokens=10_000)
    assert collator(rows)["input_ids"].shape[0] == 1  # every dialogue in one row: each but the first has neighbours
    result = evaluate_loss(model, rows, collator, batch_size=len(rows))
    assert result["loss"] == pytest.approx(expected, abs=ATOL)
    assert model.config.use_cache is True  # switched off only while scoring
