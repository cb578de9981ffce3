"""One CLI vocabulary: the same option name for the same thing in every command (README: Options).

Walks every click command of `capfilt` (subcommands of groups too) without running any of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from capfilt.cli import cli
from capfilt.commands.options import ROOT_DEFAULT

# A unit the help of options with these names must state (a bare number of what?).
UNITS = {
    r"steps$|-every$|^stop-at$": ("step",),
    r"^lr$|-lr$": ("learning rate", "lr"),
    r"timeout$|backoff$|seconds$": ("second",),
    r"image-size$|^max-pixels$": ("pixel",),
    r"batch-size$|shard-size$|cluster-size$": ("image", "pair", "row", "sample", "caption"),
}


def commands():
    """(path, command, context) for every leaf command; the contexts chain up to `capfilt`'s, so its
    context settings (show_default) apply as they do on the command line."""
    root = click.Context(cli, info_name="capfilt", **cli.context_settings)
    found = []

    def walk(group, ctx, path):
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            sub = click.Context(command, info_name=name, parent=ctx)
            if isinstance(command, click.Group):
                walk(command, sub, f"{path} {name}")
            if not isinstance(command, click.Group) or command.invoke_without_command:
                found.append((f"{path} {name}", command, sub))

    walk(cli, root, "capfilt")
    return found


COMMANDS = commands()


def options(command):
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden and p.name not in ("help",)]


def names(option):
    return [o.lstrip("-") for o in option.opts + option.secondary_opts]


def test_every_command_is_walked():
    paths = {path for path, _, _ in COMMANDS}
    assert {"capfilt train stage1", "capfilt train stage2", "capfilt synth oracle", "capfilt export webdataset",
            "capfilt eval", "capfilt ingest", "capfilt generate", "capfilt synth"} <= paths


@pytest.mark.parametrize("path, command, ctx", COMMANDS, ids=[p for p, _, _ in COMMANDS])
def test_every_option_has_help_a_shown_default_and_units(path, command, ctx):
    problems = []
    for option in options(command):
        name = option.opts[0]
        if not option.help:
            problems.append(f"{name}: no help text")
            continue
        record = option.get_help_record(ctx)[1]
        default = option.get_default(ctx, call=False)
        if not option.required and default not in (None, False) and not option.value_is_missing(default):
            if "[default:" not in record:
                problems.append(f"{name}: default {default!r} not shown")
        for pattern, units in UNITS.items():
            if any(re.search(pattern, n) for n in names(option)) and not any(u in option.help.lower() for u in units):
                problems.append(f"{name}: no unit ({' or '.join(units)}) in its help")
    assert not problems, f"{path}: " + "; ".join(problems)


def test_root_has_one_default_everywhere():
    roots = {path: o for path, command, _ in COMMANDS for o in options(command) if "--root" in o.opts}
    assert len(roots) >= 10
    for path, option in roots.items():
        assert not option.required and option.default == ROOT_DEFAULT, path


def test_a_run_is_always_named_run():
    # --run: the run a command works on; --from-run: the existing run a new --run is made from.
    for path, command, _ in COMMANDS:
        run_names = {n for o in options(command) for n in names(o) if re.search(r"(^|-)run(-|$)", n)}
        assert run_names <= {"run", "from-run"}, (path, run_names)
        if "from-run" in run_names:
            assert "run" in run_names, f"{path}: --from-run without --run"


def test_a_name_is_a_number_everywhere_or_nowhere():
    # e.g. --images: a count of images (synth, demo), never a list of files
    numeric = (click.types.IntParamType, click.types.FloatParamType)
    kinds: dict[str, dict[bool, list[str]]] = {}
    for path, command, _ in COMMANDS:
        for option in options(command):
            if not option.is_flag:
                kinds.setdefault(option.opts[0], {}).setdefault(isinstance(option.type, numeric), []).append(path)
    assert {name: k for name, k in kinds.items() if len(k) > 1} == {}


def test_out_is_always_a_folder():
    for path, command, _ in COMMANDS:
        for option in options(command):
            if "--out" in option.opts:
                folder = isinstance(option.type, click.Path) and not option.type.file_okay
                assert folder or "folder" in option.help.lower(), path


def test_checkpoints_are_named_by_stage():
    for path, command, _ in COMMANDS:
        for option in options(command):
            assert "--checkpoint" not in option.opts, f"{path}: name it --stage1 or --stage2"


def test_old_names_still_parse_hidden_from_help(capsys, tmp_path):
    from capfilt.cli import main

    train = cli.get_command(None, "train")
    stage1 = train.get_command(None, "stage1")
    ctx = stage1.make_context("stage1", ["--from-run", "r1", "--vision", "v", "--out", "o"])
    assert ctx.params["run_id"] == "r1" and ctx.params["root"] == ROOT_DEFAULT
    assert "use --run" in capsys.readouterr().err
    ctx = stage1.make_context("stage1", ["--from-run=r2", "--vision", "v", "--out", "o"])
    assert ctx.params["run_id"] == "r2"

    generate = cli.get_command(None, "generate")
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.touch(), b.touch()
    ctx = generate.make_context("generate", ["--checkpoint", "ckpt", "--images", str(a), str(b)])
    assert ctx.params["stage2"] == "ckpt" and ctx.params["old_images"] == (str(a),) and ctx.params["images"] == (str(b),)
    ctx = generate.make_context("generate", ["--stage2", "ckpt", str(a), str(b)])
    assert ctx.params["images"] == (str(a), str(b))

    for name in ("caption", "eval"):  # --max-length/--min-length: generate's --max-new-tokens/--min-new-tokens
        ctx = cli.get_command(None, name).make_context(name, ["--run", "r", "--max-length", "9", "--min-length=2"],
                                                    resilient_parsing=True)
        assert (ctx.params["max_length"], ctx.params["min_length"]) == (9, 2)

    synth = cli.get_command(None, "synth")
    ctx = synth.make_context("synth", ["--out", "w", "--annotated", "0.2"])
    assert ctx.params["old_annotated"] == 0.2 and ctx.params["annotated"] == 0.1  # synth() takes the old one

    from capfilt.commands.eval import metrics_path

    assert metrics_path("models/r") == Path("models/r/eval.json")
    assert metrics_path("old/metrics.json") == Path("old/metrics.json")  # eval's --out before it was a folder
    assert "--out is a folder now" in capsys.readouterr().err

    main(["train", "stage1", "--help"])
    shown = capsys.readouterr().out
    assert "--run" in shown and "--from-run" not in shown and f"[default: {ROOT_DEFAULT}]" in shown
