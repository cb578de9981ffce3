"""`capfilt toy pretrain`: train the toy preset's frozen pieces on a run's raw web pairs."""

from __future__ import annotations

import click


@click.group()
def toy():
    """The toy preset's stand-ins for pretrained models (no hub needed)."""


@toy.command()
@click.option("--root", required=True, help="Run store root (local folder or fsspec URL).")
@click.option("--run", required=True, help="An ingested run: its images and web captions are the training pairs.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for tokenizer/, clip/ (open_clip local-dir:) and lm/.")
@click.option("--quick", is_flag=True, help="Fewer training steps (same architectures).")
@click.option("--seed", type=int, default=0, show_default=True)
def pretrain(root, run, out, quick, seed):
    """Tokenizer, small CLIP and small causal LM, trained from scratch on the run's (image, web caption) pairs."""
    from model.toy import ToyPreset, pretrain_toy

    preset = ToyPreset.quick(seed=seed) if quick else ToyPreset(seed=seed)
    info = pretrain_toy(root, run, out, preset)
    if info["reused"]:
        click.echo(f"{out} already holds the toy models for run '{run}' (same preset): nothing to do")
        return
    c = info["counts"]
    click.echo(f"trained on {c['pairs']} pairs of run '{run}' ({c['duplicates']} duplicate images, "
               f"{c['empty_caption']} empty captions, {c['undecodable']} undecodable images left out)")
    click.echo(f"clip: loss {info['clip']['loss_first']:.3f} -> {info['clip']['loss_last']:.3f} "
               f"({info['clip']['seconds']:.0f} s); lm: loss {info['lm']['loss_first']:.3f} -> "
               f"{info['lm']['loss_last']:.3f} ({info['lm']['seconds']:.0f} s)")
    click.echo(f"tokenizer: {out}/tokenizer  clip: local-dir:{out}/clip  lm: {out}/lm")
