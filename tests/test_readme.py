"""The README's promises: its loading examples run as written, and CI runs its test command."""

from __future__ import annotations

import re

from conftest import ROOT

from gpt2ft.checkpoints import save_final_model
from gpt2ft.generate import build_generation_config

README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_loading_examples_run_as_written(tmp_path, monkeypatch, tiny_model, tiny_tokenizer, capsys):
    save_final_model(
        tiny_model,
        tiny_tokenizer,
        build_generation_config(tiny_tokenizer),
        {"gpt2ft_version": "t"},
        tmp_path / "gpt2_finetuned",
    )
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks(section("Loading the saved model"), "python")
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 2  # each example printed its reply (random-init weights: any text)


def test_ci_runs_the_readme_test_command():
    commands = code_blocks(section("Set-up: two commands"), "bash")
    assert len(commands) == 2
    test_command = commands[1].strip()
    assert "pytest" in test_command and "torch==2.13.0" in test_command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.splitlines()
    assert ci.index("torch==2.13.0") < ci.index(test_command)


def test_requirements_admit_the_cpu_wheel_without_reinstalling_colab_torch():
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    torch_line = next(line for line in requirements if line.startswith("torch"))
    assert torch_line.startswith("torch>=") and "<" not in torch_line and "==" not in torch_line
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(torch_line[len("torch") :])
