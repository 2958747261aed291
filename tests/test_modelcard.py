"""Model card: front matter, the run's metrics and settings as formatted numbers, data licence and split counts,
samples, usage code that actually runs, and "n/a" for whatever is missing."""

from __future__ import annotations

import re

import yaml

from gpt2ft.config import TrainConfig
from gpt2ft.modelcard import (
    format_duration,
    format_float,
    format_int,
    format_loss,
    format_perplexity,
    format_short,
    is_hub_id,
    md_escape,
    render_model_card,
)

METRICS = {
    "train_loss": 3.21234,
    "eval_loss": 2.87654321,
    "eval_perplexity": 17.7612,
    "test_loss": 2.91,
    "test_perplexity": 18.3568,
    "eval_bits_per_byte": 1.01234,
    "test_bits_per_byte": 1.03,
    "base_eval_loss": 3.5,
    "base_eval_perplexity": 33.1155,
    "base_eval_bits_per_byte": 1.25,
    "base_test_loss": 3.6,
    "base_test_perplexity": 36.598,
    "base_test_bits_per_byte": 1.2811,
    "chat_template": "gpt2ft (DialoGPT: EOS after every turn)",
    "train_runtime_s": 3723.4,
    "train_tokens": 1_360_000,
    "train_tokens_per_s": 365.2,
    "epochs": 3.0,
    "steps": 1971,
    "train_dialogs": 10515,
    "eval_dialogs": 923,
    "test_dialogs": 894,
    "method": "full",
    "precision": "fp16",
    "device": "Tesla T4",
    "world_size": 1,
    "trainable_parameters": 124_439_808,
    "total_parameters": 124_439_808,
    "data_counts": {
        "train": {"release": 11118, "removed": 603, "kept": 10515, "used": 10515},
        "validation": {"release": 1000, "removed": 77, "kept": 923, "used": 923},
        "test": {"release": 1000, "removed": 106, "kept": 894, "used": 894},
    },
}
SAMPLES = [
    {"context": ["Hello, how are you?"], "reference": "I'm fine, thanks.", "reply": "I am good, thank you."},
    {"context": ["Where is the bank?"], "reference": "Over there.", "reply": "<script>alert(1)</script> | *go* left"},
]


def training_config(**changes) -> dict:
    return {
        "gpt2ft_version": "0.1.0",
        "config": TrainConfig(**changes).to_dict(),
        "max_length": 1024,
        "data_source": "hub:li2017dailydialog/daily_dialog@refs/convert/parquet",
    }


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "the card does not start with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_card_lists_the_run_metrics():
    card = render_model_card(METRICS, training_config(), SAMPLES, hardware_name="Tesla T4")
    assert "| validation, the starting model | 3.5000 | 33.12 | 1.250 | 923 |" in card
    assert "| validation, fine-tuned | 2.8765 | 17.76 | 1.012 | 923 |" in card
    assert "| test, the starting model | 3.6000 | 36.60 | 1.281 | 894 |" in card
    assert "| test, fine-tuned | 2.9100 | 18.36 | 1.030 | 894 |" in card
    older = {key: value for key, value in METRICS.items() if not key.startswith("base_") and "bits" not in key}
    assert "| validation | 2.8765 | 17.76 | n/a | 923 |" in render_model_card(older, training_config(), SAMPLES, "T4")
    assert "| train (mean over the run) | 3.2123 |" in card
    assert "1 h 02 min 03 s" in card  # runtime
    assert "1,360,000" in card and "365 tokens/s" in card
    assert "Tesla T4" in card
    assert "1,971" in card  # steps
    assert "![training](chart_train.png)" in card


def test_card_front_matter():
    meta = front_matter(render_model_card(METRICS, training_config(), SAMPLES))
    assert meta["license"] == "other"
    assert "by-nc-sa" in meta["license_link"]
    assert meta["language"] == ["en"]
    assert {"gpt2", "dialogue", "text-generation"} <= set(meta["tags"])
    assert any("daily_dialog" in name for name in meta["datasets"])
    assert meta["base_model"] == "gpt2"
    assert meta["pipeline_tag"] == "text-generation"


def test_local_base_model_is_not_claimed_as_a_hub_id(tmp_path):
    card = render_model_card(METRICS, training_config(model=str(tmp_path)), SAMPLES)
    assert "base_model" not in front_matter(card)
    assert f"`{tmp_path}`" in card


def test_card_describes_data_licence_and_leakage_free_splits():
    card = render_model_card(METRICS, training_config(), SAMPLES)
    assert "CC BY-NC-SA 4.0" in card and "non-commercial" in card.lower()
    assert "| train | 11,118 | 603 | 10,515 | 10,515 |" in card
    assert "| validation | 1,000 | 77 | 923 | 923 |" in card
    assert "| test | 1,000 | 106 | 894 | 894 |" in card
    assert "hub:li2017dailydialog/daily_dialog@refs/convert/parquet" in card


def test_card_with_overlap_kept_does_not_claim_leakage_free_numbers():
    card = render_model_card(METRICS, training_config(keep_overlap=True), SAMPLES)
    assert "optimistic" in card
    assert "hold no dialogue that also occurs in train" not in card


def test_card_training_settings():
    card = render_model_card(
        METRICS, training_config(learning_rate=3e-5, batch_size=8, gradient_accumulation_steps=4), SAMPLES
    )
    assert "| learning rate | 3e-05 " in card
    assert "8 x 4 x 1 = 32 dialogues" in card
    assert "| precision | fp16 |" in card
    assert "| method | full fine-tuning |" in card
    assert "124,439,808" in card
    lora = render_model_card({**METRICS, "method": "lora"}, training_config(method="lora", lora_r=8), SAMPLES)
    assert "LoRA (r=8" in lora


def test_card_samples_are_escaped():
    card = render_model_card(METRICS, training_config(), SAMPLES)
    assert "I am good, thank you." in card and "Hello, how are you?" in card and "I'm fine, thanks." in card
    assert "<script>" not in card
    assert r"\<script\>" in card and r"\| \*go\* left" in card
    assert "No samples were generated" in render_model_card(METRICS, training_config(), [])


def test_card_usage_and_limitations():
    card = render_model_card(METRICS, training_config(output_dir="my_model"), SAMPLES)
    assert 'folder = "my_model"' in card
    assert "AutoModelForCausalLM.from_pretrained(folder)" in card and "AutoTokenizer.from_pretrained(folder)" in card
    assert 'pipeline("text-generation", model=folder)' in card
    limitations = card.split("## Limitations", 1)[1]
    for phrase in ("English only", "small model", "inappropriate", "Non-commercial"):
        assert phrase in limitations


def test_card_tolerates_missing_keys():
    card = render_model_card({}, {}, [])
    assert "n/a" in card
    assert "| validation | n/a | n/a | n/a |" in card
    assert "![training](chart_train.png)" in card
    assert "base_model" not in front_matter(card)
    partial = render_model_card(
        {"eval_loss": 2.5, "eval_perplexity": None, "data_counts": {"train": {"release": 5}}}, {"config": None}, [{}]
    )
    assert "| validation | 2.5000 | n/a |" in partial
    assert "| train | 5 | n/a | n/a | n/a |" in partial


def test_formatters():
    assert format_loss(2.87654321) == "2.8765"
    assert format_perplexity(17.7612) == "17.76" and format_perplexity(48240.689) == "48,240.69"
    assert format_float(float("inf")) == "inf"
    assert format_float(float("nan")) == format_float(None) == format_float("x") == "n/a"
    assert format_int(1_360_000.4) == "1,360,000" and format_int(None) == "n/a"
    assert format_duration(42) == "42.0 s"
    assert format_duration(725) == "12 min 05 s"
    assert format_duration(7390) == "2 h 03 min 10 s"
    assert format_duration(None) == "n/a"
    assert format_short(5e-05) == "5e-05" and format_short(16) == "16" and format_short(True) == "yes"
    assert format_short(None) == "n/a" and format_short("pack") == "pack"
    assert md_escape("a | b\n<c>") == r"a \| b \<c\>"


def test_hub_id_detection(tmp_path):
    assert is_hub_id("gpt2") and is_hub_id("openai-community/gpt2-medium")
    assert not is_hub_id(str(tmp_path))
    assert not is_hub_id("./model") and not is_hub_id("a/b/c") and not is_hub_id("") and not is_hub_id(None)


def test_card_usage_code_runs(tiny_model, tiny_tokenizer, tmp_path):
    """The Python block of the card loads a saved folder and generates, as a reader would run it."""
    from gpt2ft.checkpoints import save_final_model
    from gpt2ft.generate import build_generation_config

    folder = tmp_path / "model"
    save_final_model(
        tiny_model,
        tiny_tokenizer,
        build_generation_config(tiny_tokenizer, max_new_tokens=5),
        {"gpt2ft_version": "t"},
        folder,
    )
    card = render_model_card(METRICS, training_config(output_dir=str(folder)), SAMPLES)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    printed = []
    exec(compile(code, "model-card", "exec"), {"print": printed.append})
    assert len(printed) == 2 and all(isinstance(text, str) for text in printed)


def test_card_metadata_is_read_by_huggingface_hub_with_the_eval_results():
    from huggingface_hub import ModelCard

    card = ModelCard(render_model_card(METRICS, training_config(), SAMPLES))
    assert card.data.base_model == "gpt2" and card.data.license == "other"
    scores = {result.dataset_split: result.metric_value for result in card.data.eval_results}
    assert scores == {"validation": round(METRICS["eval_perplexity"], 4), "test": round(METRICS["test_perplexity"], 4)}


def test_card_samples_name_each_speaker_as_the_notebook_does():
    """Turns with roles by their roles; role-less turns (DailyDialog) as speakers A and B, in the card as in the
    notebook (notebook.format_turns), never User/Assistant in one and A/B in the other."""
    from gpt2ft.notebook import format_turns

    samples = [
        {"context": ["Be brief.", "Hello"], "roles": ["system", "user"], "reference": "Hi.", "reply": "Hey."},
        {"context": ["Hi", "Hello", "How are you?"], "roles": ["", "", ""], "reference": "Fine.", "reply": "Good."},
        {"context": ["Hi", "Hello", "How are you?"], "reference": "Fine.", "reply": "Good."},  # no roles recorded
    ]
    card = render_model_card(METRICS, training_config(), samples)
    assert "- *System:* Be brief.\n- *User:* Hello\n- *Model:* Hey." in card
    assert card.count("- *A:* Hi\n- *B:* Hello\n- *A:* How are you?\n- *Model:* Good.") == 2
    assert format_turns(samples[1]["context"], samples[1]["roles"]) == "A: Hi\nB: Hello\nA: How are you?"
    assert "*User:* Hi" not in card


def test_a_card_for_your_own_conversations_does_not_claim_dailydialog():
    config = {
        **training_config(data="chats.jsonl"),
        "data_source": "chats.jsonl",
        "data_is_dailydialog": False,
        "has_roles": True,
        "loss_on": "assistant",
    }
    card = render_model_card(METRICS, config, SAMPLES)
    meta = front_matter(card)
    assert "DailyDialog" not in card.split("## Data")[0] and "CC BY-NC-SA" not in card
    assert meta["license_name"] == "see-the-training-data" and "datasets" not in meta
    assert "the assistant's turns" in card and "# GPT-2 fine-tuned on chats.jsonl" in card


def test_card_says_what_cleaning_ran_and_which_template_the_model_trained_in():
    dailydialog = render_model_card(METRICS, {**training_config(), "data_is_dailydialog": True}, SAMPLES, "T4")
    assert "Text cleaning (detokenised text): yes (DailyDialog's default)" in dailydialog  # never "n/a"
    own = {**training_config(), "data_is_dailydialog": False, "data_source": "chats.jsonl"}
    assert "Text cleaning (detokenised text): no (the default for own data)" in render_model_card(
        METRICS, own, [], "T4"
    )
    forced = {**training_config(clean_text=True), "data_is_dailydialog": False, "data_source": "chats.jsonl"}
    assert "Text cleaning (detokenised text): yes\n" in render_model_card(METRICS, forced, [], "T4")
    assert "gpt2ft's (DialoGPT's)" in dailydialog
    chatml = {**METRICS, "chat_template": "ChatML (<|im_start|>/<|im_end|>), the model's own"}
    assert "the model's own chat template, kept as it came" in render_model_card(chatml, training_config(), [], "T4")
