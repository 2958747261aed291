"""The command line: `python -m gpt2ft <command> [flags]`.

    python -m gpt2ft train [--model gpt2] [--data hub] [--epochs 3] ...   fine-tune (flags mirror TrainConfig)
    python -m gpt2ft prepare --data chats.jsonl [--model gpt2]           prepare and tokenise the data (cached)
    python -m gpt2ft eval --model gpt2_finetuned --split test            loss and perplexity (+ --samples N)
    python -m gpt2ft generate --model gpt2_finetuned "Hi!" "Hello."      the next turn
    python -m gpt2ft chat --model gpt2_finetuned                         a conversation in the terminal
    python -m gpt2ft compare --base gpt2 --tuned gpt2_finetuned          before/after table
    python -m gpt2ft charts --logs-dir logs --images-dir images          rebuild the charts from the logs
    python -m gpt2ft bench --model DIR --data SRC                        throughput of gpt2ft vs the tutorial recipe
    python -m gpt2ft export --model gpt2_finetuned --format gguf         GGUF for llama.cpp/Ollama/LM Studio + Modelfile
    python -m gpt2ft serve --model gpt2_finetuned                        web page: chat + blind A/B votes (Gradio)
    python -m gpt2ft votes --db logs/votes.sqlite                        the votes counted per pair, one JSON line
    python -m gpt2ft prefer --model gpt2_finetuned --data logs/votes.sqlite  preference tuning (DPO, KTO) on the votes

Each command calls the same functions as the notebook. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    DATA_DIR,
    DEFAULT_CONCURRENCY,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_TIME_LIMIT_S,
    IMAGES_DIR,
    LOGS_DIR,
    OUTPUT_DIR,
    PreferConfig,
    RunConfig,
    TrainConfig,
    build_config,
    config_fields,
    flag_name,
    load_config_file,
    recorded_start,
    saved_run_config,
)
from .controls import asked
from .conversations import LABELS
from .errors import Gpt2ftError
from .export import DEFAULT_OUTTYPE, FORMATS, OUTTYPES, ExportError, export_gguf
from .families import check_model_source
from .votes import DEFAULT_VOTES_DB, VotesError, summarize_votes

# The commands' own modules import torch, transformers, matplotlib, gradio and the rest when a command runs, not
# here: the parser and every check of the flags load in well under a second, so a mistyped flag is an error at
# once. Imports inside the functions below defer those heavy libraries (export and votes load them only when run).

EXIT_USAGE = 2


class UsageError(Gpt2ftError):
    """Bad command-line input; the message is printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and lets main() choose the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def field_type(field: dataclasses.Field) -> Callable[[str], Any]:
    text = str(field.type)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


# The settings `prepare` takes: those that decide the prepared and tokenised data (the cache `train` then reuses).
PREPARE_FIELDS = (
    "data",
    "model",
    "cache_dir",
    "max_length",
    "max_train_dialogs",
    "max_eval_dialogs",
    "keep_overlap",
    "clean_text",
    "dialog_column",
    "validation_fraction",
    "test_fraction",
    "loss_on",
)


def add_config_flags(
    parser: argparse.ArgumentParser, only: Sequence[str] | None = None, config_class: type | None = None
) -> None:
    """One flag per field of a stage's config (TrainConfig unless another class is given; or per field in `only`);
    defaults are suppressed so only flags the user typed override --config.

    Booleans: `--no-X` for a default of True, `--X` for False, both for None (None = gpt2ft decides).
    """
    for field in config_fields(config_class):
        if only is not None and field.name not in only:
            continue
        help_text = field.metadata.get("help", "")
        if str(field.type).startswith("bool"):
            dashed = field.name.replace("_", "-")
            if field.default is None:
                parser.add_argument(
                    flag_name(field.name),
                    dest=field.name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            elif field.default is True:
                parser.add_argument(
                    "--no-" + dashed, dest=field.name, action="store_false", default=argparse.SUPPRESS, help=help_text
                )
            else:
                parser.add_argument(
                    flag_name(field.name),
                    dest=field.name,
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            continue
        parser.add_argument(
            flag_name(field.name),
            dest=field.name,
            type=field_type(field),
            choices=field.metadata.get("choices"),
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {field.default})",
        )


def config_from_args(args: argparse.Namespace, config_class: type | None = None) -> tuple[Any, set[str]]:
    """The config of a stage's flags (TrainConfig for `train` unless another class is given; over --config), and the
    names of the settings the user set."""
    file_values = load_config_file(args.config, config_class) if getattr(args, "config", None) else {}
    flags = {
        f.name: getattr(args, f.name) for f in config_fields(config_class) if hasattr(args, f.name)
    }  # typed flags only
    return build_config(file_values, config_class=config_class, **flags), set(file_values) | set(flags)


@dataclass(frozen=True)
class StageCommand:
    """One row of the table of stages: a command that trains (train, prefer, ...), its config class (its flags are
    that class's fields), and its run function as `module:function` (called with the config and the names of the
    settings the user typed; imported only when the command runs)."""

    name: str
    config_class: type[RunConfig]
    run: str
    help: str
    saved: str = "model"  # how the console names what the run saved

    def run_function(self) -> Callable[..., Any]:
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


# Adding a stage: a module with its parts (runs.Stage) and its run function, a config class in config.py, one row here.
STAGES = (
    StageCommand("train", TrainConfig, "gpt2ft.training:train", "fine-tune a model on conversations"),
    StageCommand(
        "prefer",
        PreferConfig,
        "gpt2ft.prefer:prefer",
        "preference tuning (DPO, KTO) on the page's votes or a preference dataset",
        saved="preferred model",
    ),
)


def build_parser() -> Parser:
    # allow_abbrev=False: a typo such as --epoch must be an error, not silently taken as --epochs.
    parser = Parser(
        prog="python -m gpt2ft", description="Fine-tune GPT-2 on DailyDialog and talk to it.", allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    commands.add_parser = functools.partial(commands.add_parser, allow_abbrev=False)  # type: ignore[method-assign]

    for stage in STAGES:
        command = commands.add_parser(stage.name, help=f"{stage.help} (flags mirror {stage.config_class.__name__})")
        command.add_argument("--config", metavar="FILE.json", help="settings as a JSON object; flags override it")
        add_config_flags(command, config_class=stage.config_class)

    prepare = commands.add_parser(
        "prepare", help="load, clean, split, de-duplicate and tokenise the data into the cache train uses"
    )
    add_config_flags(prepare, only=PREPARE_FIELDS)

    evaluate = commands.add_parser("eval", help="loss and perplexity on a held-out split")
    evaluate.add_argument("--model", default=OUTPUT_DIR, help="saved model folder or Hub id")
    evaluate.add_argument("--split", default="validation", choices=("validation", "test"))
    evaluate.add_argument("--max-dialogs", type=int, default=None, help="score only the first N dialogues")
    evaluate.add_argument(
        "--batch-size",
        type=int,
        default=TrainConfig.eval_batch_size,
        help="dialogues a batch (train's --eval-batch-size)",
    )
    evaluate.add_argument("--dump-tokens", metavar="FILE.jsonl", help="write each scored sequence (input_ids, labels)")
    evaluate.add_argument("--cache-dir", default=DATA_DIR)
    add_data_override_flags(evaluate)
    add_decoding_flags(evaluate)
    evaluate.add_argument("--samples", type=int, default=0, help="also generate replies for N dialogues and score them")
    evaluate.add_argument("--samples-out", metavar="FILE.jsonl", help="write (context, reference, reply) triples")
    evaluate.add_argument(
        "--control",
        type=int,
        default=0,
        metavar="N",
        help="for a model trained with --condition: ask for every label on N held-out contexts and judge the replies",
    )

    generate = commands.add_parser("generate", help="the model's next turn after the given turns")
    generate.add_argument("--model", default=OUTPUT_DIR)
    generate.add_argument("turns", nargs="+", metavar="TURN", help="the conversation so far, oldest first")
    add_decoding_flags(generate)

    chat = commands.add_parser("chat", help="talk to the model (one turn a line; /reset, /quit)")
    chat.add_argument("--model", default=OUTPUT_DIR)
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message that starts the conversation")
    add_decoding_flags(chat)

    compare = commands.add_parser("compare", help="before/after table: base model vs fine-tuned model")
    compare.add_argument(
        "--base", default=None, help="the model before fine-tuning (default: the one --tuned's folder records)"
    )
    compare.add_argument("--tuned", default=OUTPUT_DIR, help="the fine-tuned model")
    compare.add_argument("--split", default="test", choices=("validation", "test"))
    compare.add_argument("--max-dialogs", type=int, default=None)
    compare.add_argument("--samples", type=int, default=50, help="dialogues to generate replies for")
    compare.add_argument("--cache-dir", default=DATA_DIR)
    add_data_override_flags(compare)
    add_decoding_flags(compare)

    charts = commands.add_parser("charts", help="rebuild the five charts from the logs")
    charts.add_argument("--logs-dir", default=LOGS_DIR)
    charts.add_argument("--images-dir", default=IMAGES_DIR)

    bench = commands.add_parser("bench", help="training throughput: gpt2ft vs the tutorial recipe")
    bench.add_argument("--model", default=TrainConfig.model)
    bench.add_argument("--data", default=TrainConfig.data)
    bench.add_argument("--dialogs", type=int, default=1024, help="training dialogues the batches are drawn from")
    bench.add_argument("--steps", type=int, default=30, help="timed steps a run (after its warm-up)")
    bench.add_argument(
        "--batch-size", type=int, default=TrainConfig.batch_size, help="dialogues a step, as train's --batch-size"
    )
    bench.add_argument(
        "--repeats", type=int, default=3, help="runs of each variant, interleaved; the median is reported"
    )
    bench.add_argument("--variants", default="default", help="comma-separated variants, or 'default' / 'all'")
    bench.add_argument("--cache-dir", default=DATA_DIR)

    export = commands.add_parser(
        "export", help="write the model as GGUF (llama.cpp, Ollama, LM Studio) + an Ollama Modelfile"
    )
    export.add_argument("--model", default=OUTPUT_DIR, help="the model folder (a LoRA run's holds the merged model)")
    export.add_argument("--format", default=FORMATS[0], choices=FORMATS)
    export.add_argument(
        "--outtype", default=DEFAULT_OUTTYPE, choices=OUTTYPES, help=f"weight type (default: {DEFAULT_OUTTYPE})"
    )
    export.add_argument(
        "--output", metavar="FILE.gguf", help="default: <model folder>-<outtype>.gguf beside the folder"
    )
    export.add_argument("--overwrite", action="store_true", help="replace existing output files")

    serve = commands.add_parser("serve", help="a web page: chat with the model, and blind A/B votes against another")
    serve.add_argument("--model", default=OUTPUT_DIR, help="the model folder to serve")
    serve.add_argument(
        "--compare-with",
        metavar="MODEL",
        help="model for the blind comparison (default: the base model in --model's training_config.json)",
    )
    serve.add_argument("--votes-db", default=DEFAULT_VOTES_DB, metavar="PATH", help="SQLite file the votes go to")
    serve.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--share", action="store_true", help="also create a public gradio.live link (needs internet)")
    serve.add_argument("--auth", metavar="USER:PASSWORD", help="ask for this user name and password")
    serve.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT_S,
        metavar="SECONDS",
        help="longest time a reply may take",
    )
    serve.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="replies generated at once; more requests wait in the queue",
    )

    votes = commands.add_parser("votes", help="the blind votes counted per pair of models, as one JSON line")
    votes.add_argument("--db", default=DEFAULT_VOTES_DB, metavar="PATH", help="the votes database written by serve")
    return parser


def add_data_override_flags(parser: argparse.ArgumentParser) -> None:
    """--data and the data settings; each left unset takes the value the model was trained with."""
    parser.add_argument(
        "--data", default=None, help="the data source (default: the one the model was trained on, else 'hub')"
    )
    parser.add_argument("--keep-overlap", action="store_true", default=None, help="use the source's splits as they are")
    parser.add_argument(
        "--clean-text", action=argparse.BooleanOptionalAction, default=None, help="detokenise the text (or not)"
    )


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--greedy", action="store_true", help="deterministic decoding (no sampling)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    for name, labels in LABELS.items():  # controls: for a model trained with --condition
        parser.add_argument(
            f"--{name}", default=None, metavar=name.upper(), help=f"ask for a reply of this {name}: {', '.join(labels)}"
        )


def decoding_from_args(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("max_new_tokens", "no_repeat_ngram_size"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "max_new_tokens" else 0):
            raise UsageError(f"{flag_name(name)}: must be positive, got {value}")
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"{flag_name(name)}: must be > 0, got {value}")
    return {
        "greedy": args.greedy,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "repetition_penalty": args.repetition_penalty,
        "controls": asked(args.emotion, args.act) or None,
    }


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, default=str), flush=True)


def held_out_dialogs(args: argparse.Namespace, model_dir: str, split: str | None = None) -> tuple[Any, str, int | None]:
    """The split `--split` (or `split`) of the data the model was trained on (or `--data`), prepared as in
    training.

    Returns:
        (dialogues, loss mode, training window)
    """
    from .data import prepare_from_config

    config, max_length = saved_run_config(model_dir)
    changes: dict[str, Any] = {"cache_dir": args.cache_dir, "max_train_dialogs": None, "max_eval_dialogs": None}
    for name in ("data", "keep_overlap", "clean_text"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    prepared = prepare_from_config(config.replace(**changes))
    dialogs = prepared.dialogs[split or args.split]
    if args.max_dialogs is not None and split is None:
        dialogs = dialogs.select(range(min(args.max_dialogs, len(dialogs))))
    return dialogs, prepared.loss_on, max_length


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag_name(name)}: must be at least 1, got {value}")


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def run_stage_command(stage: StageCommand, args: argparse.Namespace) -> int:
    """A stage's command: its config from the flags (every flag checked before the stage's libraries load), the run,
    then where the results went (stderr) and the metrics as one JSON line (stdout)."""
    config, explicit = config_from_args(args, stage.config_class)
    result = stage.run_function()(config, explicit=explicit)
    if not result.is_main:
        return 0  # under torchrun/accelerate every process runs this; only the main one saved and reports
    print(f"{stage.saved} saved to {result.output_dir}", file=sys.stderr)
    print(f"metrics written to {Path(config.logs_dir) / 'metrics.json'}", file=sys.stderr)
    print_json(result.metrics)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from .training import prepare_cache

    config, _ = config_from_args(args)
    print_json(prepare_cache(config))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    check_positive("max_dialogs", args.max_dialogs)
    check_positive("batch_size", args.batch_size)
    if args.samples < 0:
        raise UsageError(f"--samples: must be >= 0, got {args.samples}")
    if args.control < 0:
        raise UsageError(f"--control: must be >= 0, got {args.control}")
    decoding = decoding_from_args(args)
    check_model_source(args.model)  # before torch loads: a missing folder or unreachable Hub is one line
    from .evaluation import evaluate_dialogs, evaluate_replies
    from .generate import load_for_generation

    model, tokenizer = load_for_generation(args.model)
    dialogs, loss_on, max_length = held_out_dialogs(args, args.model)
    if args.control:
        from .evaluation import control_report
        from .judge import judge_for

        judge = judge_for(args.model, lambda: held_out_dialogs(args, args.model, split="train")[0])
        report = control_report(model, tokenizer, judge, dialogs, args.control, max_length, loss_on, **decoding)
        print_json({"split": args.split, "model": args.model, **report})
        return 0
    result = {"split": args.split, "model": args.model}
    result.update(
        evaluate_dialogs(model, tokenizer, dialogs, max_length, loss_on, args.batch_size, dump_path=args.dump_tokens)
    )
    if args.samples:
        result.update(
            evaluate_replies(model, tokenizer, dialogs, args.samples, samples_out=args.samples_out, **decoding)
        )
    if args.dump_tokens:
        print(f"scored sequences written to {args.dump_tokens}", file=sys.stderr)
    print_json(result)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    decoding = decoding_from_args(args)
    check_model_source(args.model)  # before torch loads: a missing folder or unreachable Hub is one line
    from .generate import generate_reply, load_for_generation

    model, tokenizer = load_for_generation(args.model)
    print(generate_reply(model, tokenizer, args.turns, **decoding).text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    decoding = decoding_from_args(args)
    check_model_source(args.model)  # before torch loads: a missing folder or unreachable Hub is one line
    from .generate import chat_in_terminal, load_for_generation

    model, tokenizer = load_for_generation(args.model)
    chat_in_terminal(model, tokenizer, system=args.system, **decoding)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    check_positive("max_dialogs", args.max_dialogs)
    decoding = decoding_from_args(args)
    check_model_source(args.tuned, "--tuned")
    base = args.base or recorded_start(args.tuned)
    if base is None:
        raise UsageError(f"--base: {args.tuned} records no starting model; name the model to compare with")
    check_model_source(base, "--base")
    from .evaluation import compare_models, comparison_decoding, describe_decoding, format_comparison

    decoding = comparison_decoding(**decoding)
    dialogs, loss_on, max_length = held_out_dialogs(args, args.tuned)
    rows = compare_models(
        {"base": base, "fine-tuned": args.tuned},
        dialogs,
        samples=args.samples,
        loss_on=loss_on,
        max_length=max_length,
        flags={"base": "--base", "fine-tuned": "--tuned"},
        **decoding,
    )
    print(f"models: base = {base}{'' if args.base else ' (the start recorded in --tuned)'}, fine-tuned = {args.tuned}")
    print(describe_decoding(decoding))
    print(format_comparison(rows))
    return 0


def run_charts(args: argparse.Namespace) -> int:
    from .charts import is_preference_run, write_charts, write_preference_chart

    for path in write_charts(args.logs_dir, args.images_dir):
        print(path)
    if is_preference_run(args.logs_dir):
        print(write_preference_chart(args.logs_dir, args.images_dir))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks

    for name in ("dialogs", "steps", "batch_size", "repeats"):
        check_positive(name, getattr(args, name))
    run_benchmarks(
        args.model,
        args.data,
        args.dialogs,
        args.steps,
        args.batch_size,
        args.variants,
        args.cache_dir,
        print_json,
        args.repeats,
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from .serve import ServeError, check_port_free, launch_app, parse_auth, share_warning, start_server

    check_positive("concurrency", args.concurrency)
    if not args.time_limit > 0:
        raise UsageError(f"--time-limit: must be > 0, got {args.time_limit}")
    try:
        auth = parse_auth(args.auth)
        check_port_free(args.host, args.port)  # before loading models: a taken port is an error in a second
        app = start_server(args.model, args.compare_with, args.votes_db, args.time_limit, args.concurrency)
    except ServeError as error:
        raise UsageError(str(error)) from None
    except VotesError as error:
        raise UsageError(f"--votes-db: {error}") from None
    if args.share:
        print(share_warning(auth), file=sys.stderr)
    print(f"votes are stored in {args.votes_db}", file=sys.stderr)
    launch_app(app, host=args.host, port=args.port, share=args.share, auth=auth)
    return 0


def run_votes(args: argparse.Namespace) -> int:
    try:
        print_json(summarize_votes(args.db))
    except VotesError as error:
        raise UsageError(f"--db: {error}") from None
    return 0


def run_export(args: argparse.Namespace) -> int:
    try:
        result = export_gguf(args.model, args.outtype, args.output, args.overwrite)
    except ExportError as error:
        raise UsageError(str(error)) from None
    print(result.gguf_path)
    print(result.modelfile_path)
    print(
        f"{result.outtype}: {result.size_bytes / 2**20:.1f} MiB, {result.tensors} tensors, {result.seconds:.1f} s; "
        f"ollama create gpt2ft -f {result.modelfile_path} && ollama run gpt2ft",
        file=sys.stderr,
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    **{stage.name: functools.partial(run_stage_command, stage) for stage in STAGES},
    "prepare": run_prepare,
    "eval": run_eval,
    "generate": run_generate,
    "chat": run_chat,
    "compare": run_compare,
    "charts": run_charts,
    "bench": run_bench,
    "export": run_export,
    "serve": run_serve,
    "votes": run_votes,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 bad input or a run that had to stop)."""
    parser = build_parser()
    assert set(COMMANDS) == set(parser._subparsers._group_actions[0].choices), "COMMANDS and the parser disagree"
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except Gpt2ftError as error:  # UsageError, ConfigError, DataError, ModelError, TrainingError, ...
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
