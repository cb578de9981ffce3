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
              help="Folder for tokenizer/, bert/, clip/ (open_clip local-dir:) and lm/.")
@click.option("--quick", is_flag=True, help="Fewer training steps (same architectures).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds initialisation and data order.")
@click.option("--world-images", type=int, default=0, show_default=True,
              help="Pretrain on a separate synthetic web world of this many images (made once under "
                   "<root>/worlds/ and reused), never on the run being bootstrapped; 0: on the run's pairs.")
@click.option("--world-noise", type=float, default=0.4, show_default=True, help="Noise ratio of that world.")
@click.option("--world-seed", type=int, default=104729, show_default=True, help="Seed of that world.")
def pretrain(root, run, out, quick, seed, world_images, world_noise, world_seed):
    """Tokenizer, small CLIP and small causal LM, trained from scratch on (image, web caption) pairs:
    the run's, or with --world-images those of a separate pretraining world, as real frozen models
    were pretrained on other data than the source they help curate."""
    from model.toy import ToyPreset, pretrain_toy, pretrain_toy_pairs

    preset = ToyPreset.quick(seed=seed) if quick else ToyPreset.world(seed=seed) if world_images else ToyPreset(seed=seed)
    if world_images < 0:
        raise click.BadParameter(f"must be >= 0, got {world_images}", param_hint="--world-images")
    if world_images:
        from pathlib import Path

        from pipeline.synth import pretraining_world, world_pairs

        world = pretraining_world(Path(root) / "worlds" / f"toy-pretrain-{world_images}-noise{world_noise}-seed{world_seed}",
                                  world_images, world_seed, world_noise)
        pairs = world_pairs(world)
        info = pretrain_toy_pairs(pairs, out, preset, about={"world": str(world), "counts": {"pairs": len(pairs)}})
        what = f"pretraining world {world}"
    else:
        info = pretrain_toy(root, run, out, preset)
        what = f"run '{run}'"
    if info["reused"]:
        click.echo(f"{out} already holds the toy models for {what} (same preset): nothing to do")
        return
    c = info["counts"]
    if world_images:
        click.echo(f"trained on {c['pairs']} pairs of the {what} (not on run '{run}')")
    else:
        click.echo(f"trained on {c['pairs']} pairs of run '{run}' ({c['duplicates']} duplicate images, "
                   f"{c['empty_caption']} empty captions, {c['undecodable']} undecodable images left out)")
    click.echo(f"bert: masked-LM loss {info['bert']['loss_first']:.3f} -> {info['bert']['loss_last']:.3f} "
               f"({info['bert']['seconds']:.0f} s)")
    click.echo(f"clip: loss {info['clip']['loss_first']:.3f} -> {info['clip']['loss_last']:.3f} "
               f"({info['clip']['seconds']:.0f} s); lm: loss {info['lm']['loss_first']:.3f} -> "
               f"{info['lm']['loss_last']:.3f} ({info['lm']['seconds']:.0f} s)")
    click.echo(f"tokenizer: {out}/tokenizer  bert: {out}/bert  clip: local-dir:{out}/clip  lm: {out}/lm")
