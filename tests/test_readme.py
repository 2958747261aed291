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


def repository_url() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Repository"]


def colab_link(repository: str) -> str:
    return repository.replace("https://github.com/", "https://colab.research.google.com/github/") + (
        "/blob/main/GPT2_fine_tuning.ipynb"
    )


def test_the_repository_address_is_written_once_and_repeated_exactly():
    """pyproject's [project.urls] Repository is the project's address; the README's Colab badge, the notebook's
    badge and the notebook's REPO_URL (what Colab clones) repeat it exactly, and no placeholder is left."""
    import nbformat

    repository = repository_url()
    assert re.fullmatch(r"https://github\.com/[A-Za-z0-9-]+/[A-Za-z0-9._-]+", repository), repository
    badge = f"(https://colab.research.google.com/assets/colab-badge.svg)]({colab_link(repository)})"
    notebook = nbformat.read(ROOT / "GPT2_fine_tuning.ipynb", as_version=4)
    assert badge in section("The notebook") and badge in notebook.cells[0].source
    setup = next(cell.source for cell in notebook.cells if cell.cell_type == "code" and "git clone" in cell.source)
    assert re.findall(r'^REPO_URL = "(.*)"$', setup, flags=re.M) == [repository]
    # One sentence tells a fork what to change, naming all four places.
    fork = next(sentence for sentence in re.split(r"(?<=\.)\s", section("The notebook")) if "fork" in sentence)
    assert all(place in fork for place in ("pyproject.toml", "badge", "first cell", "REPO_URL"))
    everything = README + "\n".join(cell.source for cell in notebook.cells)
    assert "YOUR-GITHUB-USER" not in everything and "<owner>" not in everything


def test_the_readme_notebook_commands_work_after_the_readme_install():
    """The notebook section runs `papermill ...` and `jupyter lab ...` after the set-up's `pip install -e .`: both
    tools are runtime requirements (what that install installs, not only `[dev]`), and the parameters the papermill
    command sets are the notebook's."""
    import tomllib

    import nbformat

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert code_blocks(section("Set-up: two commands"), "bash")[0].startswith("pip install -e .")
    requirements = {
        re.split(r"[<>=\[ ;]", line.strip())[0].lower()
        for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    (command,) = [line for block in code_blocks(section("The notebook"), "bash") for line in block.splitlines()]
    assert command.startswith("papermill GPT2_fine_tuning.ipynb ") and "`jupyter lab" in section("The notebook")
    assert {"papermill", "jupyter"} <= requirements
    notebook = nbformat.read(ROOT / "GPT2_fine_tuning.ipynb", as_version=4)
    parameters = next(cell.source for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    for name in re.findall(r"-p (\w+) ", command + " "):
        assert re.search(rf"^{name} = ", parameters, flags=re.M), name
