"""A training step that is compute, not overhead: no value read back from the device in a steady step, and an
epoch fed in a few fixed shapes (issue 18, sections 2 and 3).

    cd /work/main && python -m pytest tests/test_step_overhead.py -q

On a GPU every read of a device value into Python (`.item()`, `.tolist()`, `if tensor:` ...) waits for all the
work queued before it. On the CPU the same reads are visible as `aten._local_scalar_dense` (and `.tolist()` /
`.numpy()` calls), which a TorchDispatchMode counts: the Trainer steps are counted, the collator (host data, in
DataLoader workers on a GPU) is not.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PoisonWeights, config_for
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from gpt2ft.data import DialogueCollator, tokenize_dialogs

aten = torch.ops.aten
READ_OPS = {aten._local_scalar_dense.default, aten.equal.default}
# Ops whose output size depends on values: on a GPU each waits for the device to know how much to allocate.
SIZED_BY_VALUES = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values into Python while `counting` is on (collation excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = False
        self.reads: list[str] = []
        self.targets: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and (func in READ_OPS or func in SIZED_BY_VALUES or boolean_index(func, args)):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def boolean_index(func, args) -> bool:
    """`tensor[mask]` with a boolean mask: its size is the mask's count."""
    return func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])


class CountSteadySteps(TrainerCallback):
    """Turns counting on for the steps from `first` to `last`, which must be ordinary steps (no log, no eval, no
    save): from the start of step `first` to the start of step `last + 1`, so each step's own end is included."""

    def __init__(self, mode: HostReads, first: int, last: int) -> None:
        self.mode, self.first, self.last = mode, first, last

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1  # the step about to run
        self.mode.counting = self.first <= step <= self.last
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.first <= state.global_step <= self.last:
            assert not (control.should_log or control.should_evaluate or control.should_save), "not a steady step"
        return control


class SyncErrorsInSteadySteps(CountSteadySteps):
    """On a GPU: torch raises on any synchronising call during the counted steps (torch.cuda.set_sync_debug_mode)."""

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if self.first <= step <= self.last else "default")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        return control


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_a_steady_step_on_a_gpu_never_synchronises(tiny_model_dir, dailydialog_dir, run_dirs, batching, precision):
    """The same steady steps on CUDA, in each precision, under set_sync_debug_mode("error")."""
    from gpt2ft.modeling import detect_hardware
    from gpt2ft.training import fit, load_model_for_training, plan_run, prepare_data, tokenize_data

    hardware = detect_hardware()
    if precision == "bf16" and hardware.capability < (8, 0):
        pytest.skip(f"{hardware.name} has no bf16")
    config = config_for(
        tiny_model_dir,
        dailydialog_dir,
        run_dirs,
        "--max-steps",
        "9",
        "--logging-steps",
        "8",
        "--batch-size",
        "4",
        "--batching",
        batching,
        "--precision",
        precision,
        "--eval-steps",
        "100",
        "--keep-checkpoints",
    )
    plan = plan_run(config)
    prepared = prepare_data(plan)
    loaded = load_model_for_training(plan)
    rows = tokenize_data(plan, prepared, loaded.tokenizer)
    try:
        fitted = fit(plan, loaded, rows, prepared, None, callbacks=[SyncErrorsInSteadySteps(HostReads(), 2, 7)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fitted.stop_monitor()
    assert fitted.trainer.state.global_step == 9 and fitted.totals.bad_step is None


@pytest.fixture
def count_reads(monkeypatch):
    """A HostReads mode, with `.tolist()`/`.numpy()` counted too and the collator left out."""
    mode = HostReads()
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if mode.counting:
                mode.reads.append(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    collate = DialogueCollator.collate_rows

    def uncounted(self, *args, **kwargs):
        was, mode.counting = mode.counting, False
        try:
            batch = collate(self, *args, **kwargs)
            mode.targets.append(int((batch["labels"][:, 1:] != -100).sum()))  # what each batch holds, in order
            return batch
        finally:
            mode.counting = was

    monkeypatch.setattr(DialogueCollator, "collate_rows", uncounted)
    return mode


@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_a_steady_training_step_reads_nothing_back_from_the_device(
    count_reads, tiny_model_dir, dailydialog_dir, run_dirs, batching
):
    """Steps 2-7 of a run that logs every 8 steps: not one value of theirs is read into Python. The fused AdamW is
    CUDA's default (on the CPU the default AdamW keeps its step counter on the host and reads it there, which on a
    GPU is no device read)."""
    from gpt2ft.training import fit, load_model_for_training, plan_run, prepare_data, tokenize_data

    config = config_for(
        tiny_model_dir,
        dailydialog_dir,
        run_dirs,
        "--max-steps",
        "9",
        "--logging-steps",
        "8",
        "--batch-size",
        "4",
        "--batching",
        batching,
        "--optim",
        "adamw_torch_fused",
        "--eval-steps",
        "100",
        "--keep-checkpoints",
    )
    plan = plan_run(config)
    prepared = prepare_data(plan)
    loaded = load_model_for_training(plan)
    rows = tokenize_data(plan, prepared, loaded.tokenizer)
    with count_reads:
        fitted = fit(plan, loaded, rows, prepared, None, callbacks=[CountSteadySteps(count_reads, 2, 7)])
    fitted.stop_monitor()
    assert count_reads.reads == []
    # ... while the whole-run totals are still exact: every target token of the 9 steps counted once.
    assert fitted.trainer.state.global_step == 9
    assert fitted.totals.target_tokens == sum(count_reads.targets[:9])


def test_the_counter_sees_a_read_when_there_is_one(count_reads):
    """The probe itself: an .item(), a tolist(), an `if tensor`, a boolean index and a nonzero are each seen."""
    value = torch.ones(3).sum()
    with count_reads:
        count_reads.counting = True
        value.item()
        value.reshape(1).tolist()
        if value > 0:
            pass
        torch.arange(4)[torch.arange(4) > 1]
        torch.arange(4).nonzero()
        torch.arange(4)[torch.tensor([0, 2])]  # a gather by index: no read
    assert len(count_reads.reads) == 5


@pytest.mark.parametrize("schedule", [("--max-steps", "12", "--eval-steps", "4"), ("--epochs", "2")])
def test_a_bad_loss_between_logging_steps_still_stops_the_run_before_any_checkpoint(
    tiny_model_dir, dailydialog_dir, run_dirs, schedule
):
    """The loss turns NaN at step 3; the run logs every 5 steps and checkpoints every 4 steps, or at each epoch's
    end (which comes after the stop, and asks for an evaluation and a checkpoint again): it stops naming step 3,
    with no checkpoint written after it and no model saved."""
    from pathlib import Path

    from gpt2ft.checkpoints import TrainingError, checkpoint_dir, complete_checkpoints
    from gpt2ft.training import train

    config = config_for(tiny_model_dir, dailydialog_dir, run_dirs, "--logging-steps", "5", *schedule)
    with pytest.raises(TrainingError, match="step 3") as stopped:
        train(config, callbacks=[PoisonWeights(at=2)])  # every loss from step 3 on is NaN
    assert complete_checkpoints(checkpoint_dir(run_dirs["output"])) == []  # any would hold NaN weights
    assert "No checkpoint was written" in str(stopped.value)
    assert not (Path(run_dirs["output"]) / "model.safetensors").exists()


def epoch_shapes(loader) -> tuple[set[tuple[int, ...]], float, int, list[int]]:
    """The distinct input shapes of one epoch, its share of padded slots, its target count and the windows fed."""
    shapes, slots, targets = set(), 0, 0
    for batch in loader:
        shapes.add(tuple(batch["input_ids"].shape))
        slots += batch["input_ids"].numel()
        targets += int((batch["labels"] != -100).sum())
    fed = sorted(window for batch in loader.batch_sampler for row in batch for window in row)
    lengths = [len(ids) for ids in loader.dataset.windows["input_ids"]]
    return shapes, 1 - sum(lengths) / slots, targets, fed


def test_an_epoch_of_dailydialog_is_fed_in_few_shapes_with_little_padding(shared_data, tmp_path):
    """Default settings (pack, --batch-size 16, --eval-batch-size 32, GPT-2's 1,024-token window), the real corpus and
    tokenizer: at most 8 shapes in training and in evaluation, under 15% padded slots, every window fed once with
    every target (nothing truncated)."""
    from gpt2ft.config import TrainConfig
    from gpt2ft.data import prepare_dialogs
    from gpt2ft.modeling import load_tokenizer

    defaults = TrainConfig()
    tokenizer = load_tokenizer(str(shared_data / "gpt2-tokenizer"))
    prepared = prepare_dialogs(str(shared_data / "dailydialog"), cache_dir=tmp_path)
    collator = DialogueCollator(tokenizer, defaults.batching)
    for split, batch_size, shuffle in (
        ("train", defaults.batch_size, True),
        ("validation", defaults.eval_batch_size, False),
    ):
        rows = tokenize_dialogs(prepared.dialogs[split], tokenizer, 1024)
        loader = collator.loader(rows, batch_size, shuffle=shuffle, seed=defaults.seed)
        shapes, padded, targets, fed = epoch_shapes(loader)
        assert len(shapes) <= 8, (split, shapes)
        assert padded < 0.15, (split, padded)
        assert fed == list(range(len(rows))) and targets == sum(rows["n_targets"])
        # A step holds about `batch_size` dialogues, so an epoch has about as many steps as dialogues / batch_size.
        assert 0.85 < len(loader) * batch_size / len(rows) < 1.15, (split, len(loader))
