"""The `capfilt` command line: one entry point, one module per command under capfilt/commands/.

Errors a user can cause (CapfiltError, bad options) print as one line and exit with status 2;
anything else is a bug and keeps its traceback.

`--quiet/-q` and `--verbose/-v` (capfilt/logs.py) are accepted by the group and by every command
and subcommand, before or after its name: `capfilt -q train stage1 ...` = `capfilt train stage1 -q ...`.
"""

from __future__ import annotations

import importlib
import sys

import click

from capfilt import logs
from capfilt.environment import apply_defaults
from capfilt.errors import CapfiltError
from capfilt.packages import check_own_packages

# name -> module:attribute; imported only when that command runs, so `capfilt --help` is fast.
COMMANDS = {
    "bootstrap": ("capfilt.commands.bootstrap", "bootstrap", "Bootstrap rounds: curate, train, caption and filter with your own model."),
    "demo": ("capfilt.commands.demo", "demo", "Bootstrap a model on a served synthetic world and measure what CapFilt bought."),
    "curate": ("capfilt.commands.curate", "curate", "Ingest, caption and filter a source in one go."),
    "filter": ("capfilt.commands.filter", "filter_command", "Score, dedup and select captions into curated Parquet."),
    "caption": ("capfilt.commands.caption", "caption", "Add N synthetic captions per ingested image (Ray actors)."),
    "synth": ("capfilt.commands.synth", "synth", "Create or serve a synthetic LAION-like world."),
    "ingest": ("capfilt.commands.ingest", "ingest_command", "Download a URL source into image shards (img2dataset on Ray)."),
    "export": ("capfilt.commands.export", "export", "Export a run's curated pairs as WebDataset tars (open_clip, LAVIS)."),
    "train": ("capfilt.commands.train", "train", "Train the Q-Former on a curated run (stage1, stage2)."),
    "finetune": ("capfilt.commands.finetune", "finetune", "Finetune the filter and the captioner on a clean annotated set."),
    "toy": ("capfilt.commands.toy", "toy", "Pretrain the toy preset's tokenizer, CLIP and LM on a run (no hub)."),
    "generate": ("capfilt.commands.generate", "generate", "Caption images or answer a question with a Stage 2 checkpoint."),
    "eval": ("capfilt.commands.eval", "eval_command", "Retrieval, caption, attribute and filter metrics of a run."),
}


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:  # not given: keep what main() read from the environment (a parent capfilt's choice)
        logs.configure(value)


def verbosity_options() -> list[click.Option]:
    """Fresh --quiet/--verbose options; eager, so they apply before any other option's callback."""
    common = dict(default=None, expose_value=False, is_eager=True, callback=_set_verbosity)
    return [
        click.Option(["--quiet", "-q", "quiet"], flag_value=logs.QUIET, **common,
                     help="Only warnings and errors: no progress, libraries at WARNING/ERROR."),
        click.Option(["--verbose", "-v", "verbose"], flag_value=logs.VERBOSE, **common,
                     help="Debug logs from capfilt, info logs from libraries."),
    ]


def with_verbosity(command: click.Command) -> click.Command:
    """`command` and its subcommands, each accepting --quiet and --verbose (added once)."""
    if not any(param.name == "quiet" for param in command.params):
        command.params.extend(verbosity_options())
    for sub in getattr(command, "commands", {}).values():
        with_verbosity(sub)
    return command


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return with_verbosity(getattr(importlib.import_module(module), attr))

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                                                 "show_default": True})
@click.version_option(package_name="capfilt")
def cli():
    """capfilt: curate image-text data with CapFilt and train Q-Former models on it."""


with_verbosity(cli)


def main(argv: list[str] | None = None) -> None:
    apply_defaults()  # before any command imports Ray, Prefect or transformers
    logs.configure()  # the environment's verbosity (CAPFILT_LOG_LEVEL) until --quiet/--verbose says otherwise
    try:
        check_own_packages()
        cli.main(args=argv, prog_name="capfilt", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("capfilt: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        click.echo(f"capfilt: error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except CapfiltError as exc:
        click.echo(f"capfilt: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("capfilt: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
