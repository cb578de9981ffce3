"""`capfilt toy pretrain`: train the toy preset's frozen pieces on a run's raw web pairs."""

from __future__ import annotations

import click

from capfilt.commands.options import root_option


@click.group()
def toy():
    """The toy preset's stand-ins for pretrained models (no hub needed)."""


@toy.command()
@root_option()
@click.option("--run", required=True, help="An ingested run: its images and web captions are the training pairs "
              "(unless --world-images).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for tokenizer/, bert/, clip/ (open_clip local-dir:), lm/, stage1/ (--stage1-steps) and "
                   "stage2/ (--stage2-steps).")
@click.option("--quick", is_flag=True, help="Fewer training steps (same architectures).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds initialisation and data order.")
@click.option("--world-images", type=int, default=0, show_default=True,
              help="Pretrain on a separate synthetic web world of this many images (made once under "
                   "<root>/worlds/ and reused), never on the run being bootstrapped; 0: on the run's pairs.")
@click.option("--world-noise", type=float, default=0.4, show_default=True, help="Noise ratio of that world.")
@click.option("--world-seed", type=int, default=104729, show_default=True, help="Seed of that world.")
@click.option("--clip-world-images", type=int, default=0, show_default=True,
              help="With --world-images: the CLIP alone pretrains on a pretraining world of this many images "
                   "(contrastive learning needs more images than the text pieces need texts); 0: the same world.")
@click.option("--stage1-steps", type=int, default=0, show_default=True,
              help="Also pretrain a Stage 1 (the toy Q-Former) for this many steps on the CLIP's pairs, into "
                   "<out>/stage1: a model pretrained on other data than the source, for `finetune filter --stage1` "
                   "(a filter finetuned from the round's own Stage 1 remembers the pairs it judges); 0: none.")
@click.option("--stage2-steps", type=int, default=0, show_default=True,
              help="With --stage1-steps: also pretrain a Stage 2 (the toy captioner) from that Stage 1 for this many "
                   "steps on the world's pairs that it did not corrupt, into <out>/stage2: a captioner pretrained on "
                   "cleaned data, for `finetune captioner --stage2`; 0: none.")
def pretrain(**options):
    """Tokenizer, small CLIP and small causal LM, trained from scratch on (image, web caption) pairs:
    the run's, or with --world-images those of a separate pretraining world, as real frozen models
    were pretrained on other data than the source they help curate."""
    from flows.steps import make

    make("toy pretrain", options, where="").execute(say=click.echo)
