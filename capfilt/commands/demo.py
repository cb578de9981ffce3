"""`capfilt demo`: a synthetic LAION-like world served on 127.0.0.1, bootstrapped with the toy preset."""

from __future__ import annotations

import time
from pathlib import Path

import click

from capfilt.commands.options import root_option
from capfilt.logs import is_quiet


# Held-out clean images: at 600 one seed's text->image R@1 has a standard error below 2 points
# (sqrt(p(1-p)/600) <= 0.0204 at p = 0.5, <= 0.019 for p <= 0.35); --quick keeps 200.
HELDOUT_IMAGES, HELDOUT_IMAGES_QUICK = 600, 200
# Wall time measured on an idle 2-core machine (README; quick 90 s and ablation 702 s on 2026-12-03,
# full 708 s on 2026-12-05 with the toy Stage 1 and Stage 2), rounded up; printed so a newcomer knows
# what to expect. A machine busy with other work takes several times longer.
EXPECTED_MINUTES = {"quick": 2, "full": 12, "ablation": 16}


@click.command()
@root_option("Where the world, runs, models and report go.")
@click.option("--quick", is_flag=True, help="A smaller world and fewer steps (about 3 minutes on 2 cores).")
@click.option("--images", type=int, default=None, help="Images in the world (default 600, --quick 200).")
@click.option("--noise", type=float, default=0.4, show_default=True, help="Fraction of corrupted web captions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same world and models.")
@click.option("--blip/--no-blip", "blip", default=None,
              help="Round 1 follows BLIP: finetune filter and captioner on the world's annotated set, keep every "
                   "caption whose score reaches the calibrated threshold (bootstrap --annotated). Default: on, but "
                   "off with --quick (its 20-image annotated set is too small to calibrate on); --no-blip: round 1 "
                   "ranks each image's captions by round 0's ITM and keeps the top 2.")
@click.option("--ablation", is_flag=True,
              help="BLIP's Table 1 (bootstrap --ablation): also train a captioner-only and a filter-only arm; the "
                   "table compares raw, captioner, filter, capfilt and oracle (two more trainings).")
@click.option("--set", "sets", multiple=True, metavar="STAGE.OPTION=VALUE", help="Override a toy-preset option.")
def demo(root, quick, images, noise, seed, blip, ablation, sets):
    """Bootstrap a model end to end on a synthetic world and print what CapFilt bought."""
    from capfilt.commands.bootstrap import bootstrap_params, format_summary
    from flows.bootstrap import bootstrap as bootstrap_flow
    from flows.bootstrap import check
    from flows.server import ensure_prefect_api
    from model.toy.server import WorldServer
    from model.toy.world import WorldConfig, free_port, load_world, make_world

    say = (lambda line: None) if is_quiet() else click.echo  # what it is doing; --quiet keeps only the result
    started = time.perf_counter()
    images = images or (200 if quick else 600)
    world_dir = Path(root) / "worlds" / f"seed{seed}-{images}-{noise}"
    if (world_dir / "world.json").exists():  # same world, same URLs: reruns resume instead of redoing
        world = load_world(world_dir)
    else:
        world = make_world(world_dir, WorldConfig(images=images, seed=seed, noise=noise, port=free_port(),
                                                  slow_seconds=5.0))
    # The clean evaluation set: the same generator, another seed, never downloaded or trained on.
    heldout_images = HELDOUT_IMAGES_QUICK if quick else HELDOUT_IMAGES
    heldout_dir = Path(root) / "worlds" / f"heldout-seed{seed}-{heldout_images}"
    if not (heldout_dir / "world.json").exists():
        make_world(heldout_dir, WorldConfig(images=heldout_images, seed=seed + 7919, noise=0.0, bad_urls_per_kind=0,
                                            duplicates=0, annotated=0))
    say(f"world: {world['images']} images, noise {world['noise_ratio']:.2f}, in {world_dir}; "
        f"annotated set: {world.get('annotated_images', 0)} images in {world.get('annotated', '-')}; "
        f"held-out evaluation world: {heldout_images} clean images in {heldout_dir}")
    default_blip = not quick
    blip = default_blip if blip is None else blip
    # the default recipe keeps the plain name; the other one says which it is
    recipe = "" if blip == default_blip else "-blip" if blip else "-no-blip"
    run = ("demo-quick" if quick else "demo") + recipe + ("-ablation" if ablation else "")
    minutes = EXPECTED_MINUTES["quick" if quick else "ablation" if ablation else "full"]
    say(f"when it is done (about {minutes} min on 2 CPU cores): the table here and the report at "
        f"{Path(root) / 'runs' / run / 'report' / 'index.html'}")
    # every held-out image is evaluated (eval's own default samples 200); a --set eval.max-images wins
    sets = (f"eval.max-images={heldout_images}", *sets)
    if blip and not world.get("annotated"):
        raise click.UsageError(f"--blip: the world in {world_dir} has no annotated set; use a new --root.")
    params = bootstrap_params(world["source"], root, run, 1, "toy", quick, world["ground_truth"], sets, None, None,
                              str(heldout_dir), annotated=world.get("annotated") if blip else None, ablation=ablation)
    check(params)  # every stage's options, before Prefect, Ray or any download starts
    ensure_prefect_api(say)
    with WorldServer(world_dir) as server:
        say(f"serving it at {server.base_url}")
        summary = bootstrap_flow(params)
    click.echo(format_summary(summary))
    click.echo(f"demo finished in {time.perf_counter() - started:.0f} s")
