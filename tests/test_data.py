"""gpt2ft.data: layouts, parsing, cleaning, leakage removal, format, labels, windowing, collation."""

from __future__ import annotations

import random
import zipfile

import datasets
import pytest
import torch
from conftest import default_splits, made_up_labels, write_layout

from gpt2ft.chat_format import RenderedConversation, Turn
from gpt2ft.conversations import LABELS, turns_of
from gpt2ft.data import (
    DIALOG_FEATURES,
    IGNORE_INDEX,
    DialogueCollator,
    clean_turn,
    dialogs_dataset,
    normalize_dialog,
    pack_rows,
    prepare_dialogs,
    tokenize_dialogs,
    tokenize_prepared,
    turn_targets,
    window_dialog,
)
from gpt2ft.sources import DataError, LoadReport, load_dailydialog, parse_split

NAMES = ("d.txt", "a.txt", "e.txt")


@pytest.mark.parametrize("layout", ["split_zips", "outer_zip", "extracted", "parquet"])
def test_every_layout_loads_the_same_dialogues(tmp_path, layout):
    splits = default_splits(20, 5)
    dialogs = load_dailydialog(str(write_layout(tmp_path / layout, layout, splits)))
    assert set(dialogs) == {"train", "validation", "test"}
    assert dialogs["train"].column_names == ["dialog", "act", "emotion", "id"]
    for split, expected in splits.items():
        assert dialogs[split]["dialog"] == expected  # stripped turns, identical across layouts
        assert dialogs[split]["act"] == [made_up_labels(turns)[0] for turns in expected]  # the release's ids
        assert dialogs[split]["emotion"] == [made_up_labels(turns)[1] for turns in expected]
        assert dialogs[split]["id"] == [
            f"{split}-{line}" for line in range(1, len(expected) + 1)
        ]  # same in every layout
    first = dialogs["train"][0]
    assert len(first["dialog"]) == len(first["act"]) == len(first["emotion"])
    assert all(isinstance(a, int) for a in first["act"])


def test_parse_split_strips_turns_and_drops_empty_pieces():
    columns = parse_split(" Hi there ! __eou__  __eou__ Hello . __eou__\n", "1 2\n", "0 0\n", NAMES)
    assert columns == {"dialog": [["Hi there !", "Hello ."]], "act": [[1, 2]], "emotion": [[0, 0]], "id": ["train-1"]}


def test_turn_label_mismatch_is_skipped_and_reported():
    report = LoadReport()
    text = "A . __eou__ B . __eou__\nC . __eou__ D . __eou__ E . __eou__\n"
    columns = parse_split(text, "1 2\n1 2\n", "0 0\n0 0\n", NAMES, report, split="test")
    assert columns["dialog"] == [["A .", "B ."]] and columns["id"] == ["test-1"]
    assert len(report.skipped) == 1 and "d.txt:2" in report.skipped[0] and "3 turns" in report.skipped[0]


@pytest.mark.parametrize(
    "dialogs, acts, emotions, message",
    [
        ("A . __eou__\n\nB . __eou__\n", "1\n\n1\n", "0\n\n0\n", "d.txt:2: empty line"),
        ("A . __eou__\nno separator here\n", "1\n1\n", "0\n0\n", "d.txt:2: no '__eou__'"),
        ("A . __eou__\nB . __eou__\n", "1\n", "0\n0\n", "a.txt: has 1 lines"),
        ("A . __eou__\n", "x\n", "0\n", "a.txt:1: expected whitespace-separated integer"),
    ],
)
def test_malformed_release_files_name_file_and_line(dialogs, acts, emotions, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        parse_split(dialogs, acts, emotions, NAMES)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    root = write_layout(tmp_path / "d", "extracted", default_splits(5, 3))
    path = root / "train" / "dialogues_train.txt"
    path.write_bytes(path.read_bytes().replace(b"Hello", b"H\xffllo", 1))
    with pytest.raises(DataError, match=r"dialogues_train\.txt:\d+: not UTF-8"):
        load_dailydialog(str(root))


def test_missing_split_and_missing_path_are_clear(tmp_path):
    root = write_layout(tmp_path / "d", "split_zips", default_splits(5, 3))
    (root / "test.zip").unlink()
    with pytest.raises(DataError, match="has train, validation but no test"):
        load_dailydialog(str(root))
    with pytest.raises(DataError, match="no such file or folder"):
        load_dailydialog(str(tmp_path / "nowhere"))


def test_zip_without_expected_members(tmp_path):
    path = tmp_path / "ijcnlp_dailydialog.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "nothing here")
    with pytest.raises(DataError, match="missing member train.zip"):
        load_dailydialog(str(path))


def test_real_release_loads_with_its_one_misaligned_line(shared_data):
    report = LoadReport()
    dialogs = load_dailydialog(str(shared_data / "dailydialog"), report=report)
    assert (len(dialogs["train"]), len(dialogs["validation"]), len(dialogs["test"])) == (11117, 1000, 1000)
    assert dialogs["train"]["id"][7850:7852] == ["train-7851", "train-7853"]  # ids are release lines: 7852 skipped
    assert report.skipped == [
        f"{shared_data / 'dailydialog' / 'train.zip'}:train/dialogues_train.txt:7852: "
        "12 turns but 11 act and 11 emotion labels"
    ]


# --- cleaning: one test per rule, on examples from the release ------------------------------------------------


@pytest.mark.parametrize(
    "release, clean",
    [
        (
            "Say , Jim , how about going for a few beers after dinner ?",
            "Say, Jim, how about going for a few beers after dinner?",
        ),  # punctuation
        ("it ’ s a piece of cake", "it's a piece of cake"),  # curly apostrophe + split contraction
        ("Good.Let ' s go now .", "Good. Let's go now."),  # missing space + contraction
        ("I guess you are right.But what shall we do ?", "I guess you are right. But what shall we do?"),
        ("I ' Ve been there . You ' re right .", "I've been there. You're right."),  # the release's "Ve"
        ('Good . Smile . Say " cheese " .', 'Good. Smile. Say "cheese".'),  # paired double quotes
        ("I got $ 500 a month ( before tax ) .", "I got $500 a month (before tax)."),
        ("He is an acrobat 。", "He is an acrobat."),  # CJK full stop
        ("Well . . . I am not sure .", "Well... I am not sure."),
        ("That’s “ great ” news !", 'That\'s "great" news!'),
        ("Mr.Smith is here", "Mr. Smith is here"),
        ("The U.S.A. is big", "The U.S.A. is big"),  # capitals before the dot: left alone
        ("  lots   of   space  ", "lots of space"),
    ],
)
def test_clean_turn(release, clean):
    assert clean_turn(release) == clean


def test_cleaning_can_be_turned_off(dailydialog_dir):
    raw = prepare_dialogs(str(dailydialog_dir), clean_text=False, keep_overlap=True)
    cleaned = prepare_dialogs(str(dailydialog_dir), clean_text=True, keep_overlap=True)
    assert any(" ?" in m["content"] for messages in raw.dialogs["train"]["messages"] for m in messages)
    assert not any(" ?" in m["content"] for messages in cleaned.dialogs["train"]["messages"] for m in messages)


# --- leakage ----------------------------------------------------------------------------------------------------


def test_remove_overlap_drops_train_duplicates_and_eval_dialogues_seen_in_train(tmp_path):
    a, b, c, d = ["Hi .", "Hello ."], ["How are you ?", "Fine ."], ["Bye .", "See you ."], ["New one .", "Yes ."]
    splits = {"train": [a, b, ["hi .", "hello ."], a], "validation": [["Hi  .", "Hello ."], c], "test": [b, d, d]}
    prepared = prepare_dialogs(
        str(write_layout(tmp_path / "d", "extracted", splits)), cache_dir=tmp_path, clean_text=False
    )
    kept, counts = prepared.dialogs, prepared.counts
    turns = {split: [turns_of(messages) for messages in kept[split]["messages"]] for split in kept}
    assert turns["train"] == [a, b]  # case and spacing differences count as duplicates
    assert turns["validation"] == [c]
    assert turns["test"] == [d, d]  # only overlap with train is removed from test
    assert kept["test"]["id"] == ["test-2", "test-3"]  # the release lines they came from
    assert counts["train"] == {"release": 4, "removed": 2, "kept": 2, "used": 2}
    assert counts["validation"]["removed"] == 1 and counts["test"]["removed"] == 1


def test_normalize_dialog_ignores_release_spacing():
    assert normalize_dialog(["It ' s fine , right.But no ."]) == normalize_dialog(["it's fine, right. But no."])
    assert normalize_dialog(["A .", "B ."]) != normalize_dialog(["A . B ."])
    # With roles, the same words said by someone else are another conversation.
    assert normalize_dialog(["Hi.", "Yo."], ["user", "assistant"]) != normalize_dialog(
        ["Hi.", "Yo."], ["assistant", "user"]
    )


def test_keep_overlap_restores_release_splits(dailydialog_dir):
    deduped = prepare_dialogs(str(dailydialog_dir))
    release = prepare_dialogs(str(dailydialog_dir), keep_overlap=True)
    assert len(release.dialogs["train"]) == 120 > len(deduped.dialogs["train"])
    assert deduped.counts["train"]["removed"] == 120 - len(deduped.dialogs["train"])


def test_real_release_leakage_counts(shared_data):
    prepared = prepare_dialogs(str(shared_data / "dailydialog"), cache_dir=None)
    # Stricter than exact matching (which gives 10,514 / 77 / 106): spacing variants of the release count too.
    assert prepared.counts["train"]["kept"] == 10359
    assert prepared.counts["validation"]["removed"] == 98
    assert prepared.counts["test"]["removed"] == 127
    # The release's first dialogue, with its labels by name (train line 1: acts 3 4 2 2 2 3 4 1 3 4, emotions
    # six 0s then four 4s).
    first = prepared.dialogs["train"][0]
    assert first["id"] == "train-1" and first["messages"][0]["content"].startswith("Say, Jim, how about")
    assert [m["act"] for m in first["messages"]] == [LABELS["act"][int(a) - 1] for a in "3422234134"]
    assert [m["emotion"] for m in first["messages"]] == ["no emotion"] * 6 + ["happiness"] * 4


def expected_labels(split_dialogs: dict[str, list[list[str]]], record: dict) -> tuple[list[str], list[str]]:
    """The label names the release files give the prepared `record` (found by its id, `<split>-<line>`)."""
    split, line = record["id"].rsplit("-", 1)
    acts, emotions = made_up_labels(split_dialogs[split][int(line) - 1])
    return [LABELS["emotion"][e] for e in emotions], [LABELS["act"][a - 1] for a in acts]


def test_dailydialog_labels_come_out_on_every_turn_by_name(tmp_path, dailydialog_dir):
    prepared = prepare_dialogs(str(dailydialog_dir), cache_dir=tmp_path)
    splits = default_splits()  # what conftest wrote into dailydialog_dir
    seen = set()
    for split, dialogs in prepared.dialogs.items():
        assert dialogs.features == DIALOG_FEATURES
        for record in dialogs:
            emotions, acts = expected_labels(splits, record)
            assert [m["emotion"] for m in record["messages"]] == emotions
            assert [m["act"] for m in record["messages"]] == acts
            assert record["source"] == str(dailydialog_dir) and record["id"].startswith(f"{split}-")
            seen.update(emotions)
    assert {"no emotion", "anger", "disgust"} <= seen  # the labels vary from turn to turn
    # Written to Arrow and memory-mapped back (as datasets caches a split), the labels stay as they were.
    prepared.dialogs.save_to_disk(tmp_path / "saved")
    reloaded = datasets.load_from_disk(str(tmp_path / "saved"))
    assert reloaded["train"]["messages"][:] == prepared.dialogs["train"]["messages"][:]


def test_labels_of_your_own_messages_survive_preparation_and_its_cache(tmp_path):
    from conftest import make_conversations, write_conversations

    emotions = LABELS["emotion"]
    conversations = [
        [{**m, "emotion": emotions[n % 7]} if m["role"] == "user" else m for m in c]
        for n, c in enumerate(make_conversations(60, 3))
    ]
    path = write_conversations(tmp_path / "labelled.jsonl", conversations)
    first = prepare_dialogs(str(path), cache_dir=tmp_path / "cache", keep_overlap=True)
    again = prepare_dialogs(str(path), cache_dir=tmp_path / "cache", keep_overlap=True)
    assert again.dialogs["train"].cache_files  # read back from datasets' cache files, not recomputed in memory
    for prepared in (first, again):
        messages = [m for split in prepared.dialogs.values() for c in split["messages"] for m in c]
        assert {m["emotion"] for m in messages if m["role"] == "user"} == set(emotions)
        assert {m["emotion"] for m in messages if m["role"] != "user"} == {None}  # no label given: null
        assert {m["act"] for m in messages} == {None}
    assert again.dialogs["train"]["messages"][:] == first.dialogs["train"]["messages"][:]
    assert again.dialogs["train"]["id"][:] == first.dialogs["train"]["id"][:]


def test_max_dialog_limits_apply_after_deduplication(dailydialog_dir):
    prepared = prepare_dialogs(str(dailydialog_dir), max_train_dialogs=7, max_eval_dialogs=3)
    assert [len(prepared.dialogs[s]) for s in ("train", "validation", "test")] == [7, 3, 3]
    assert prepared.counts["train"]["used"] == 7


# --- format, labels, windows ----------------------------------------------------------------------------------


def test_turn_targets_follow_the_loss_mode():
    roles = ["system", "user", "assistant", "user", "assistant"]
    assert turn_targets(roles, "all") == [False, True, True, True, True]  # a system message is never a target
    assert turn_targets(roles, "responses") == [False, False, True, True, True]
    assert turn_targets(roles, "assistant") == [False, False, True, False, True]
    assert turn_targets(["", "", ""], "responses") == [False, True, True]


def test_tokenised_rows_have_eos_after_each_turn_and_label_every_real_token(tiny_tokenizer):
    rows = tokenize_dialogs(dialogs_dataset([["Hi, how are you?", "I am fine."]]), tiny_tokenizer, 256)
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    eos = tiny_tokenizer.eos_token_id
    assert ids[0] == eos and ids[-1] == eos and ids.count(eos) == 3
    assert tiny_tokenizer.decode(ids) == "<|endoftext|>Hi, how are you?<|endoftext|>I am fine.<|endoftext|>"
    assert labels[0] == IGNORE_INDEX  # the leading EOS is context
    assert labels[1:] == ids[1:]  # every turn's EOS is a target
    assert rows[0]["n_targets"] == len(ids) - 1


def test_loss_on_responses_masks_the_first_turn(tiny_tokenizer):
    dialog = ["Hi, how are you?", "I am fine."]
    rows = tokenize_dialogs(dialogs_dataset([dialog]), tiny_tokenizer, 256, loss_on="responses")
    first_turn = len(tiny_tokenizer(dialog[0])["input_ids"]) + 2  # leading EOS + turn + its EOS
    assert set(rows[0]["labels"][:first_turn]) == {IGNORE_INDEX}
    assert rows[0]["labels"][first_turn:] == rows[0]["input_ids"][first_turn:]


def gpt2_format(turns: list[list[int]], eos_id: int = 0) -> RenderedConversation:
    """A conversation of token-id turns in gpt2ft's format: EOS as the head, every turn followed by EOS and all of it
    trainable, each token one byte of content (EOS none)."""
    return RenderedConversation(
        [eos_id], [Turn(turn + [eos_id], [True] * (len(turn) + 1), [1] * len(turn) + [0]) for turn in turns]
    )


def test_windows_split_at_turn_boundaries_and_predict_every_target_once():
    turns = [[10 + t] * (5 + t) for t in range(8)]  # turn t is 5 + t copies of token 10 + t
    windows = window_dialog(gpt2_format(turns), max_length=24, targets=[True] * len(turns))
    assert len(windows) > 1 and all(len(ids) <= 24 for ids, _, _ in windows)
    targets = [label for _, labels, _ in windows for label in labels if label != IGNORE_INDEX]
    assert targets == [tok for turn in turns for tok in turn + [0]]  # nothing dropped, nothing repeated
    assert sum(target_bytes for _, _, target_bytes in windows) == sum(len(turn) for turn in turns)
    for ids, _labels, _ in windows:
        assert ids[0] == 0 and ids[-1] == 0  # each window starts with EOS and ends at a turn boundary
    later_ids, later_labels, _ = windows[1]
    assert later_labels[1] == IGNORE_INDEX  # later windows begin with earlier turns as context


def test_a_turn_longer_than_the_window_is_cut_not_dropped():
    windows = window_dialog(gpt2_format([[7] * 50]), max_length=16, targets=[True])
    targets = [label for _, labels, _ in windows for label in labels if label != IGNORE_INDEX]
    assert targets == [7] * 50 + [0]
    assert all(len(ids) <= 16 for ids, _, _ in windows)


def test_pad_collator_pads_labels_with_ignore_index_not_by_token_id(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    rows = [
        {"input_ids": [eos, 5, 6, eos], "labels": [IGNORE_INDEX, 5, 6, eos]},
        {"input_ids": [eos, 7, eos], "labels": [IGNORE_INDEX, 7, eos]},
    ]
    batch = DialogueCollator(tiny_tokenizer, "pad")(rows)
    assert batch["input_ids"].shape == (2, 8)  # padded to a multiple of 8
    assert batch["labels"][0, :4].tolist() == [IGNORE_INDEX, 5, 6, eos]  # EOS stays a target even though pad == EOS
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 5
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[1, 0, 2].tolist() == [True, True, True, False, False, False, False, False]  # the dialogue sees itself
    assert mask[1, 0, 5].tolist() == [False, False, False, True, True, True, False, False]  # padding sees padding


def test_pack_collator_restarts_positions_per_dialogue(tiny_tokenizer):
    rows = [
        {"input_ids": [0, 5, 0], "labels": [IGNORE_INDEX, 5, 0]},
        {"input_ids": [0, 7, 8, 0], "labels": [IGNORE_INDEX, 7, 8, 0]},
    ]
    batch = DialogueCollator(tiny_tokenizer, "pack")(rows)
    pad = tiny_tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[0, 7, 8, 0, 0, 5, 0, pad]]  # longest first, width a multiple of 8
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]  # the padding is a segment of its own
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 7, 8, 0, IGNORE_INDEX, 5, 0, IGNORE_INDEX]]


def test_pack_collator_fills_rows_best_fit(tiny_tokenizer):
    rows = [
        {"input_ids": [0] + [5] * (n - 1), "labels": [IGNORE_INDEX] + [5] * (n - 1)} for n in (30, 20, 20, 10, 10, 10)
    ]
    batch = DialogueCollator(tiny_tokenizer, "pack", row_tokens=50)(rows)
    assert batch["input_ids"].shape == (2, 56)  # 100 tokens -> 2 full rows of 50, rounded up to a multiple of 8
    assert (batch["labels"] != IGNORE_INDEX).sum() == 100 - 6
    starts = (~batch["attention_mask"][:, 0].diagonal(offset=-1, dim1=1, dim2=2)).sum(dim=1) + 1
    assert sorted(starts.tolist()) == [3, 5]  # 30 + 20 and 20 + 10 + 10 + 10, each + 1 padding segment


def test_pack_rows_fills_each_row_within_its_width_and_drops_nothing():
    lengths = [900, 40, 500, 300, 200, 12, 512, 100, 60, 7]
    rows = pack_rows(lengths, widths=(512, 1024))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    filled = [sum(lengths[i] for i in row) for row in rows]
    assert all(size <= (1024 if any(lengths[i] > 512 for i in row) else 512) for row, size in zip(rows, filled))
    # 2,631 tokens: the 900-token window's row takes 124 more (the 100), and 1,607 need four rows of 512: optimal.
    assert len(rows) == 5
    # A window wider than every width is an error in the plan, not a silent cut.
    with pytest.raises(ValueError, match="600 tokens is wider than the widest row"):
        pack_rows([600], widths=(512,))


def test_a_split_is_fed_in_few_fixed_shapes_and_each_window_once(tiny_tokenizer):
    rng = random.Random(3)
    lengths = [rng.choice([5, 9, 14, 30, 41, 70]) for _ in range(200)] + [180]
    rows = [{"input_ids": [0] * n, "labels": [IGNORE_INDEX] + [1] * (n - 1), "length": n} for n in lengths]
    for batching in ("pack", "pad"):
        loader = DialogueCollator(tiny_tokenizer, batching, row_tokens=64).loader(
            rows, batch_size=8, shuffle=True, seed=1
        )
        shapes, seen, targets, slots = set(), [], 0, 0
        for batch_rows in loader.batch_sampler:
            seen += [window for row in batch_rows for window in row]
        for batch in loader:
            shapes.add(tuple(batch["input_ids"].shape))
            targets += int((batch["labels"] != IGNORE_INDEX).sum())
            slots += batch["input_ids"].numel()
        assert sorted(seen) == list(range(len(rows)))
        assert targets == sum(n - 1 for n in lengths)  # nothing truncated
        assert len(shapes) <= 4, shapes
        if batching == "pack":
            assert {shape[1] for shape in shapes} <= {64, 128, 256} and 1 - sum(lengths) / slots < 0.15
        again = [list(b) for b in loader.batch_sampler]
        loader.batch_sampler.set_epoch(1)
        assert [list(b) for b in loader.batch_sampler] != again  # reshuffled each epoch, the same way every time
        loader.batch_sampler.set_epoch(0)
        assert [list(b) for b in loader.batch_sampler] == again


def test_tokenisation_cache_is_reused_and_keyed_by_settings(tmp_path, dailydialog_dir, tiny_tokenizer):
    prepared = prepare_dialogs(str(dailydialog_dir), cache_dir=tmp_path)
    first = tokenize_prepared(prepared, tiny_tokenizer, 256, tmp_path)
    folders = list((tmp_path / "tokenized").iterdir())
    assert len(folders) == 1
    again = prepare_dialogs(str(dailydialog_dir), cache_dir=tmp_path)  # a new process would prepare it again
    second = tokenize_prepared(again, tiny_tokenizer, 256, tmp_path)
    assert second["train"]["input_ids"] == first["train"]["input_ids"]
    assert len(list((tmp_path / "tokenized").iterdir())) == 1  # reused, not rebuilt
    tokenize_prepared(again, tiny_tokenizer, 128, tmp_path)
    tokenize_prepared(
        prepare_dialogs(str(dailydialog_dir), cache_dir=tmp_path, loss_on="responses"), tiny_tokenizer, 256, tmp_path
    )
    assert len(list((tmp_path / "tokenized").iterdir())) == 3  # each setting has its own entry


def test_real_data_token_counts(shared_data):
    from gpt2ft.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(shared_data / "gpt2-tokenizer"))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    prepared = prepare_dialogs(str(shared_data / "dailydialog"), max_train_dialogs=500)
    rows = tokenize_dialogs(prepared.dialogs["train"], tokenizer, 1024)
    assert len(rows) == 500  # no dialogue needs a second window at GPT-2's context
    assert 100 < sum(rows["length"]) / len(rows) < 150


def test_fixed_shapes_top_up_the_last_batch_without_changing_the_loss(tiny_model, tiny_tokenizer):
    from gpt2ft.evaluation import evaluate_loss

    eos = tiny_tokenizer.eos_token_id
    rows = [
        {"input_ids": [eos, 5, 6, 7, eos], "labels": [IGNORE_INDEX, 5, 6, 7, eos]},
        {"input_ids": [eos, 8, eos], "labels": [IGNORE_INDEX, 8, eos]},
    ]
    rows = rows * 3  # 6 windows, batches of 4: the last batch of each shape is topped up with empty rows
    for batching in ("pack", "pad"):
        collator = DialogueCollator(tiny_tokenizer, batching)
        widths = {tuple(batch["input_ids"].shape) for batch in collator.loader(rows, batch_size=4)}
        assert len(widths) == 1
        expected = evaluate_loss(tiny_model, rows, collator, batch_size=6)
        got = evaluate_loss(tiny_model, rows, collator, batch_size=4)
        assert got["tokens"] == expected["tokens"] == 18 and got["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_the_zip_fallback_is_streamed_and_checked_against_the_release(tmp_path, monkeypatch):
    """The official zip is fetched over plain http: only the release's exact bytes are kept, read in chunks."""
    import hashlib
    import io
    import urllib.request

    import gpt2ft.sources as data

    good = write_layout(tmp_path / "release", "outer_zip").read_bytes()
    reads = []

    class Response(io.BytesIO):
        def read(self, size=-1):
            assert size and size > 0, "the download must be streamed in chunks, not read whole"
            reads.append(size)
            return super().read(size)

    def serve(payload):
        monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Response(payload))

    monkeypatch.setattr(data, "ZIP_SIZE", len(good))
    monkeypatch.setattr(data, "ZIP_SHA256", hashlib.sha256(good).hexdigest())
    cache = tmp_path / "cache"
    serve(good[:-10] + b"x" * 10)  # right size, wrong bytes
    with pytest.raises(DataError, match="SHA-256"):
        data.download_zip(cache, "http://example.invalid/z.zip", data.ZIP_SIZE, data.ZIP_SHA256)
    serve(good + b"trailing")
    with pytest.raises(DataError, match="more than the release"):
        data.download_zip(cache, "http://example.invalid/z.zip", data.ZIP_SIZE, data.ZIP_SHA256)
    assert not list(cache.iterdir())  # nothing kept from a bad download
    serve(good)
    path = data.download_zip(cache, "http://example.invalid/z.zip", data.ZIP_SIZE, data.ZIP_SHA256)
    assert path.read_bytes() == good and sorted(p.name for p in cache.iterdir()) == [data.ZIP_NAME] and reads
    assert data.ZIP_URL.startswith("http://") and len(data.ZIP_SHA256) == 64


def test_a_cache_of_all_the_data_serves_any_limit(tmp_path, dailydialog_dir, tiny_tokenizer):
    everything = tokenize_prepared(
        prepare_dialogs(str(dailydialog_dir), cache_dir=tmp_path), tiny_tokenizer, 256, tmp_path
    )
    limited = prepare_dialogs(str(dailydialog_dir), cache_dir=tmp_path, max_train_dialogs=7, max_eval_dialogs=3)
    rows = tokenize_prepared(limited, tiny_tokenizer, 256, tmp_path)
    assert len(list((tmp_path / "tokenized").iterdir())) == 1  # sliced from the full cache, not tokenised again
    direct = tokenize_dialogs(limited.dialogs["train"], tiny_tokenizer, 256, "all")
    assert rows["train"]["input_ids"][:] == direct["input_ids"][:] == everything["train"]["input_ids"][: len(direct)]
    assert len(rows["validation"]) == len(tokenize_dialogs(limited.dialogs["validation"], tiny_tokenizer, 256))


def test_a_resumed_run_on_several_processes_still_reshuffles_by_epoch(tiny_tokenizer):
    """accelerate wraps the batch sampler for each process (BatchSamplerShard) and, on resume, once more
    (SkipBatchSampler): the epoch must still reach it, or a resumed epoch >= 1 would replay epoch 0's order."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, skip_first_batches

    rows = [
        {"input_ids": [0] * n, "labels": [IGNORE_INDEX] + [1] * (n - 1), "length": n}
        for n in [5, 9, 14, 30, 41, 70] * 20
    ]
    loader = DialogueCollator(tiny_tokenizer, "pack", row_tokens=64).loader(rows, batch_size=8, shuffle=True, seed=1)
    sampler = loader.batch_sampler
    shard = DataLoaderShard(
        loader.dataset,
        batch_sampler=BatchSamplerShard(sampler, num_processes=2, process_index=0),
        collate_fn=loader.collate_fn,
    )
    shard.set_epoch(1)
    straight = [list(batch) for batch in shard.batch_sampler][2:]
    sampler.set_epoch(0)  # a new process after a crash
    resumed = skip_first_batches(shard, 2)
    resumed.set_epoch(1)  # what the Trainer does at the start of the resumed epoch
    assert sampler.epoch == 1
    assert [list(batch) for batch in resumed.batch_sampler] == straight


def test_training_rows_mix_long_and_short_dialogues(tiny_tokenizer):
    """Packed longest first, rows would hold the longest dialogues together and the shortest together, and every
    batch would be a sample of one kind (that trained a tiny model to half the quality in the same epochs). Training
    packs in a random order, and deals equal lengths anew each epoch: rows mix both kinds, and change."""
    rng = random.Random(5)
    lengths = [rng.choice([30, 50]) for _ in range(800)]
    rows = [{"input_ids": [0] * n, "labels": [IGNORE_INDEX] + [1] * (n - 1), "length": n} for n in lengths]
    sampler = DialogueCollator(tiny_tokenizer, "pack").loader(rows, batch_size=16, shuffle=True, seed=0).batch_sampler
    epoch0 = [row for batch in sampler.batches() for row in batch]
    mixed = [row for row in epoch0 if len({lengths[i] for i in row}) == 2]
    assert len(mixed) > len(epoch0) / 2
    sampler.set_epoch(1)
    epoch1 = {frozenset(row) for batch in sampler.batches() for row in batch}
    assert len(epoch1 & {frozenset(row) for row in epoch0}) < len(epoch0) / 4  # new neighbours, same shapes
    assert sorted(len(row) for row in epoch1) == sorted(len(row) for row in epoch0)
    longest_first = pack_rows(lengths, widths=(512,))
    assert sum(len({lengths[i] for i in row}) == 2 for row in longest_first) <= 2  # what the ordering prevents
