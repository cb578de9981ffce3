"""`capfilt caption`: add N synthetic captions per ingested image of a run (Ray actors, GPU when present)."""

from __future__ import annotations

import click

from capfilt.commands.options import NEW_TOKENS, Command, executor_option, root_option

from model.decoding import Decoding

_DEFAULTS = Decoding()


@click.command(cls=Command, renamed=NEW_TOKENS)
@root_option()
@click.option("--run", "run_id", required=True, help="Run id whose images/ shards to caption.")
@click.option("--captioner", required=True, help="Hub id (e.g. Salesforce/blip-image-captioning-large), save_pretrained folder, or 'none' (web captions only).")
@click.option("--num-captions", type=int, default=_DEFAULTS.num_captions, show_default=True, help="Synthetic captions per image.")
@click.option("--top-p", type=float, default=_DEFAULTS.top_p, show_default=True, help="Nucleus sampling mass.")
@click.option("--max-new-tokens", "max_length", type=int, default=_DEFAULTS.max_length, show_default=True,
              help="Most tokens generated per caption.")
@click.option("--min-new-tokens", "min_length", type=int, default=_DEFAULTS.min_length, show_default=True,
              help="Fewest tokens generated per caption.")
@click.option("--repetition-penalty", type=float, default=_DEFAULTS.repetition_penalty, show_default=True,
              help="> 1 discourages repeating a token already generated; 1: off.")
@click.option("--prompt", default=_DEFAULTS.prompt, help="Text the captions continue, e.g. 'a photo of' (not stored in the caption).")
@click.option("--num-beams", type=int, default=_DEFAULTS.num_beams, show_default=True, help="> 1: beam search instead of sampling.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Same seed, same captions.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per generate call.")
@click.option("--actors", type=int, default=None, help="Captioner actors (default: one per GPU, else one).")
@click.option("--cpus-per-actor", type=int, default=1, show_default=True, help="CPU cores (torch threads on CPU) per actor.")
@executor_option()
def caption(**options):
    """Write captions/<shard>.parquet: each image's web caption plus N synthetic ones."""
    from flows.steps import make

    return make("caption", options, where="").execute(say=click.echo)
