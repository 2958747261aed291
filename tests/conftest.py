"""Shared fixtures: a tiny GPT-2 and tokenizer built locally, and synthetic DailyDialog data in every layout.

Nothing here touches the network. The tokenizer is a byte-level BPE trained in a second on the synthetic corpus;
the model is a 2-layer, 32-wide GPT-2 with a 256-token context. Tests that use the real data under
`../shared/data` take the `shared_data` fixture, which skips when it is absent.
"""

from __future__ import annotations

import io
import json
import os
import random
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from transformers import TrainerCallback  # noqa: E402 - after the offline switches above, which it reads on import

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SPLITS = ("train", "validation", "test")
EOS = "<|endoftext|>"

# Question -> answer pairs in the release's pre-tokenised style. A dialogue is a few of these exchanges, so the
# second turn of each pair is predictable from the first: a tiny model visibly learns it within a few steps.
EXCHANGES = [
    ("Hello , how are you ?", "I am fine , thanks . And you ?"),
    ("What time is it ?", "It ' s ten o'clock ."),
    ("Do you like tea ?", "Yes , I love green tea ."),
    ("Where are you going ?", "I am going to the bank.See you later !"),
    ("Can you help me ?", "Sure , what do you need ?"),
    ("How much is this shirt ?", "It costs $ 20 ."),
    ("Is it raining outside ?", "No , it ' s sunny today ."),
    ("What ' s your name ?", "My name is Tom ."),
]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: they skip cleanly without it (CI, this CPU machine) and run on a lent GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ARTIFACT_FOLDERS = ("data", "logs", "images", "gpt2_finetuned")


@pytest.fixture(scope="session", autouse=True)
def checkout_artifact_folders_stay_empty():
    """No test may write into the checkout's own artifact folders (every run goes to tmp_path)."""

    def listing() -> dict[str, list[str]]:
        return {
            name: sorted(p.name for p in (ROOT / name).iterdir()) for name in ARTIFACT_FOLDERS if (ROOT / name).is_dir()
        }

    before = listing()
    yield
    assert listing() == before, "a test wrote into the checkout's artifact folders"


def make_dialog(rng: random.Random) -> list[str]:
    turns: list[str] = []
    for _ in range(rng.randint(1, 3)):
        turns.extend(rng.choice(EXCHANGES))
    return turns


def make_split(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [make_dialog(rng) for _ in range(n)]


def made_up_labels(turns: list[str]) -> tuple[list[int], list[int]]:
    """Release label ids for a dialogue's turns, different from turn to turn: act 1 + i % 4 (inform, question,
    directive, commissive, ...) and emotion i % 7 (no emotion, anger, disgust, ...) for turn i."""
    return [1 + i % 4 for i in range(len(turns))], [i % 7 for i in range(len(turns))]


def release_texts(dialogs: list[list[str]]) -> tuple[str, str, str]:
    """The three line-aligned release files for a list of dialogues (acts and emotions made up: made_up_labels)."""
    dialog_lines = [" __eou__ ".join(turns) + " __eou__" for turns in dialogs]
    labels = [made_up_labels(turns) for turns in dialogs]
    act_lines = [" ".join(map(str, acts)) for acts, _ in labels]
    emotion_lines = [" ".join(map(str, emotions)) for _, emotions in labels]
    return tuple("\n".join(lines) + "\n" for lines in (dialog_lines, act_lines, emotion_lines))


def default_splits(n_train: int = 120, n_eval: int = 30) -> dict[str, list[list[str]]]:
    return {"train": make_split(n_train, 0), "validation": make_split(n_eval, 1), "test": make_split(n_eval, 2)}


def split_zip_bytes(split: str, dialogs: list[list[str]]) -> bytes:
    buffer = io.BytesIO()
    names = (f"dialogues_{split}.txt", f"dialogues_act_{split}.txt", f"dialogues_emotion_{split}.txt")
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in zip(names, release_texts(dialogs)):
            archive.writestr(f"{split}/{name}", text)
    return buffer.getvalue()


def write_layout(root: Path, layout: str, splits: dict[str, list[list[str]]] | None = None) -> Path:
    """Write synthetic DailyDialog in one of the supported layouts and return the path to pass as --data.

    Layouts: "split_zips" (folder of train.zip/validation.zip/test.zip, as in ../shared/data/dailydialog),
    "outer_zip" (the official ijcnlp_dailydialog.zip nesting the split zips), "extracted" (<split>/dialogues_*.txt),
    "parquet" (the Hub's default/<split>/0000.parquet).
    """
    splits = splits or default_splits()
    root.mkdir(parents=True, exist_ok=True)
    if layout == "split_zips":
        for split, dialogs in splits.items():
            (root / f"{split}.zip").write_bytes(split_zip_bytes(split, dialogs))
        return root
    if layout == "outer_zip":
        path = root / "ijcnlp_dailydialog.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for split, dialogs in splits.items():
                archive.writestr(f"ijcnlp_dailydialog/{split}.zip", split_zip_bytes(split, dialogs))
            archive.writestr("ijcnlp_dailydialog/readme.txt", "synthetic\n")
        return path
    if layout == "extracted":
        for split, dialogs in splits.items():
            folder = root / split
            folder.mkdir(parents=True, exist_ok=True)
            names = (f"dialogues_{split}.txt", f"dialogues_act_{split}.txt", f"dialogues_emotion_{split}.txt")
            for name, text in zip(names, release_texts(dialogs)):
                (folder / name).write_text(text, encoding="utf-8")
        return root
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for split, dialogs in splits.items():
            folder = root / "default" / split
            folder.mkdir(parents=True, exist_ok=True)
            table = pa.table(
                {
                    # The Hub copy keeps the release's trailing spaces on each turn.
                    "dialog": [[turn + " " for turn in turns] for turns in dialogs],
                    "act": [made_up_labels(turns)[0] for turns in dialogs],
                    "emotion": [made_up_labels(turns)[1] for turns in dialogs],
                }
            )
            pq.write_table(table, folder / "0000.parquet")
        return root
    raise ValueError(layout)


SYSTEM_PROMPTS = ["You are a friendly shop assistant.", "Answer briefly."]


def make_conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Chat conversations in the `messages` layout: an optional system prompt, then user/assistant exchanges drawn
    from EXCHANGES (question by the user, answer by the assistant), so the answers are learnable."""
    rng = random.Random(seed)
    conversations = []
    for index in range(n):
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[index % 2]}] if index % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            question, answer = rng.choice(EXCHANGES)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        conversations.append(messages)
    return conversations


def as_sharegpt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def write_conversations(path: Path, conversations: list, layout: str = "messages") -> Path:
    """Conversations as a file: layout "messages" or "sharegpt" (records with those keys) or "dialogue" (plain turns);
    the file type follows the suffix: .jsonl (JSON Lines), .json (an array) or .parquet."""
    if layout == "messages":
        records = [{"messages": conversation} for conversation in conversations]
    elif layout == "sharegpt":
        records = [{"conversations": as_sharegpt(conversation)} for conversation in conversations]
    else:
        records = [
            {"dialogue": [m["content"] for m in conversation if m["role"] != "system"]}
            for conversation in conversations
        ]
    return write_records(path, records)


def write_records(path: Path, records: list[dict]) -> Path:
    """Records as JSON Lines (.jsonl), a JSON array (.json) or parquet, by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def build_tokenizer(folder: Path, extra_corpus: tuple[str, ...] = ()):
    """A byte-level BPE (GPT-2's algorithm) trained on the synthetic corpus (and `extra_corpus`, a test's own text),
    with <|endoftext|> as EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gpt2ft.data import clean_turn

    corpus = [clean_turn(turn) for pair in EXCHANGES for turn in pair] + [turn for pair in EXCHANGES for turn in pair]
    corpus += [
        "Hi, how are you?",
        "What do you do for a living?",
        "I work in a bank.",
        "See you tomorrow!",
        *extra_corpus,
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=256
    )
    wrapped.save_pretrained(folder)
    return wrapped


def build_tiny_model_dir(folder: Path, seed: int = 0, n_embd: int = 32, extra_corpus: tuple[str, ...] = ()) -> Path:
    """A random-init GPT-2 (2 layers, `n_embd` wide, 256 positions) saved with the tiny tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(folder, extra_corpus)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=n_embd,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


# ChatML as SmolLM2-135M-Instruct's tokenizer carries it (a default system message when the conversation has none),
# and as Qwen2.5 writes it without one: the two shapes of template gpt2ft must train in.
CHATML_WITH_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_chatml_tokenizer(folder: Path, template: str = CHATML_WITH_SYSTEM):
    """The synthetic corpus's byte-level BPE with ChatML's special tokens: `<|im_end|>` ends every turn and is EOS
    (and pad, as in SmolLM2), `<|im_start|>` opens one, `<|endoftext|>` is the document end; the chat template is
    `template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [EOS, "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [turn for pair in EXCHANGES for turn in pair] + ["system", "user", "assistant", "You are a helpful AI"]
    tokenizer.train_from_iterator(corpus * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=EOS,
        model_max_length=512,
    )
    wrapped.chat_template = template
    wrapped.save_pretrained(folder)
    return wrapped


# The families gpt2ft supports beside GPT-2, as tiny random-init models: 2 layers, 64 wide, grouped-query attention
# (4 heads, 2 key/value heads), 512 positions. Llama ties its embeddings (as SmolLM2 does), Qwen2 does not and has
# biased q/k/v projections, Qwen3 adds q/k norms.
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}, CHATML_WITH_SYSTEM),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}, CHATML),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 16}, CHATML),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}, CHATML),
}


def build_tiny_family_dir(folder: Path, family: str, seed: int = 0) -> Path:
    """A random-init model of `family` (a key of FAMILY_CONFIGS) saved with a ChatML tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, extra, template = FAMILY_CONFIGS[family]
    tokenizer = build_chatml_tokenizer(folder, template)
    torch.manual_seed(seed)
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random-init Llama (tied embeddings, SmolLM2's ChatML template); do not modify it."""
    return build_tiny_family_dir(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random-init Qwen2 (untied embeddings, ChatML without a default system message)."""
    return build_tiny_family_dir(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random-init GPT-2 and its tokenizer (do not modify; copy it first)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from gpt2ft.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tiny_model(tiny_model_dir):
    from gpt2ft.modeling import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def dailydialog_dir(tmp_path_factory) -> Path:
    """Synthetic DailyDialog (120 train, 30 validation, 30 test dialogues) as a folder of split zips."""
    return write_layout(tmp_path_factory.mktemp("dailydialog"), "split_zips")


@pytest.fixture
def run_dirs(tmp_path) -> dict[str, str]:
    """Output, logs, images and cache folders of one run, inside tmp_path."""
    return {name: str(tmp_path / name) for name in ("output", "logs", "images", "cache")}


def train_argv(model_dir, data, dirs, *extra: str) -> list[str]:
    """argv for a short CPU training run into `dirs`."""
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output-dir",
        dirs["output"],
        "--logs-dir",
        dirs["logs"],
        "--images-dir",
        dirs["images"],
        "--cache-dir",
        dirs["cache"],
        "--batch-size",
        "8",
        "--eval-batch-size",
        "16",
        "--logging-steps",
        "1",
        "--system-interval-s",
        "0.2",
        *extra,
    ]


def batches_per_epoch(model_dir, data, batch_size: int, cache_dir) -> int:
    """How many batches gpt2ft's packing makes of the training split in an epoch (the steps of a one-process epoch)."""
    from gpt2ft.data import DialogueCollator, prepare_dialogs, tokenize_dialogs
    from gpt2ft.modeling import load_model_config, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    rows = tokenize_dialogs(
        prepare_dialogs(str(data), cache_dir).dialogs["train"], tokenizer, load_model_config(str(model_dir)).n_positions
    )
    return len(DialogueCollator(tokenizer, "pack").loader(rows, batch_size))


def config_for(model_dir, data, dirs, *flags):
    """The TrainConfig that `python -m gpt2ft` builds from train_argv(...) (what a user would type)."""
    from gpt2ft.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(train_argv(model_dir, data, dirs, *flags)))[0]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, dailydialog_dir):
    """One finished training run shared by every test that only reads its artifacts: 3 epochs on the synthetic
    dialogues through `python -m gpt2ft train` (main), with the metrics line it printed. Do not modify its folders.

    Returns:
        (dirs, printed metrics)
    """
    import contextlib

    from gpt2ft.cli import main

    root = tmp_path_factory.mktemp("trained_run")
    dirs = {name: str(root / name) for name in ("output", "logs", "images", "cache")}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(train_argv(tiny_model_dir, dailydialog_dir, dirs, "--epochs", "3", "--learning-rate", "3e-3"))
    assert code == 0
    printed = json.loads([line for line in stdout.getvalue().splitlines() if line.startswith("{")][-1])
    return dirs, printed


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real DailyDialog and the GPT-2 tokenizer); skips when absent."""
    if not (SHARED_DATA / "dailydialog" / "train.zip").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class Crash(RuntimeError):
    pass


class CrashAt(TrainerCallback):
    """Raises Crash at the end of step `at`, as a Colab disconnect would end the process."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise Crash(f"disconnected at step {self.at}")
        return control


class PoisonWeights(TrainerCallback):
    """Writes NaN into the embeddings at the end of step `at`, as an fp16 overflow would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            import torch

            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))
        return control


def crash_during_final_save(monkeypatch) -> None:
    """From now on, the final save raises Crash once the model's weights are in the staging folder and before the
    folder is swapped in: a process killed while it writes the model (the checkpoints are all written)."""
    import gpt2ft.checkpoints
    from gpt2ft.config import TRAINING_CONFIG

    write_json = gpt2ft.checkpoints.write_json

    def crashing(path, payload):
        if Path(path).name == TRAINING_CONFIG and ".partial-" in Path(path).parent.name:
            assert (Path(path).parent / "model.safetensors").is_file()
            raise Crash("killed while saving the final model")
        return write_json(path, payload)

    monkeypatch.setattr(gpt2ft.checkpoints, "write_json", crashing)


def assert_same_weights(folder, reference) -> None:
    """The two model folders hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    tensors, expected = load_file(Path(folder) / "model.safetensors"), load_file(Path(reference) / "model.safetensors")
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
