"""The CLI's vocabulary: one name per meaning in every command (README: Options).

- `--root DIR`: the data root holding runs/<run>/ (and worlds/, models/); `./data` unless given.
- `--run RUN`: the run a command works on: the one it reads (train, eval, export, toy), or the one
  it fills (ingest, caption, filter, curate). `--from-run RUN`: the existing run a new `--run` is
  made from (ingest's reuse, synth oracle).
- `--out DIR`: the folder a command writes its outputs to (checkpoints, metrics, tars, a world).
- `--stage1` / `--stage2 CKPT`: a Stage 1 / Stage 2 checkpoint a command reads.
- `--max-new-tokens` / `--min-new-tokens`: the most / fewest tokens generated per caption.
- `--executor auto|ray|local`: where a model-holding stage (caption, score) runs its batches.
- `--quiet/-q` / `--verbose/-v`: how much a command logs; capfilt/cli.py adds them to every command.

Old spellings keep parsing (scripts written against them still run): a command built with
`cls=Command, renamed={old: new}` rewrites them before parsing, keeps them out of --help and says
on stderr which name to use instead.
"""

from __future__ import annotations

import click

ROOT_DEFAULT = "./data"
# caption and eval said --max-length / --min-length for what generate (and transformers) call new tokens
NEW_TOKENS = {"--max-length": "--max-new-tokens", "--min-length": "--min-new-tokens"}
# pipeline/model_stage.py's EXECUTORS, spelled here so that --help imports no stage (a test keeps them equal)
EXECUTORS = ("auto", "ray", "local")


def root_option(help: str = "Data root (local path or fsspec URI) holding runs/<run>/."):
    return click.option("--root", default=ROOT_DEFAULT, show_default=True, help=help)


def executor_option():
    return click.option(
        "--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
        help="Where the model runs its batches: ray (an actor pool, one shard per actor call), local (this "
             "process, no Ray), auto (on this machine with one actor and no "
             "cluster: local when its first batches, timed, say Ray's start-up would be over 15% of the run; "
             "else ray).")


def rename_options(args: list[str], renamed: dict[str, str], warn: bool = True) -> list[str]:
    """`args` with every old option name (also in `--old=value` form) replaced by its new one."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":  # what follows is arguments, never options
            return out + list(args[i:])
        name, eq, value = arg.partition("=")
        if name in renamed:
            if warn:
                click.echo(f"capfilt: warning: {name} is an old name; use {renamed[name]}", err=True)
            arg = renamed[name] + eq + value
        out.append(arg)
    return out


class Command(click.Command):
    """A click command whose `renamed` old option names still parse, hidden from --help."""

    def __init__(self, *args, renamed: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, rename_options(args, self.renamed, warn=not ctx.resilient_parsing))
