"""`capfilt synth`: create a synthetic world; `capfilt synth serve DIR`: serve it on 127.0.0.1."""

from __future__ import annotations

import json

import click

from capfilt.commands.options import root_option
from model.toy.server import WorldServer
from model.toy.world import BAD_URL_KINDS, NOISE_KINDS, WorldConfig, load_world, make_world


@click.group(invoke_without_command=True)
@click.option("--out", type=click.Path(file_okay=False), help="Folder to write the world to.")
@click.option("--images", type=int, default=200, show_default=True, help="Number of distinct images.")
@click.option("--noise", type=float, default=0.4, show_default=True, help="Fraction of images whose web caption is corrupted.")
@click.option("--noise-kinds", default=",".join(NOISE_KINDS), show_default=True, help="Comma-separated corruption kinds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--image-size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--port", type=int, default=0, help="Port the URLs name (default: a free one, recorded in the world).")
@click.option("--bad-urls-per-kind", type=int, default=1, show_default=True, help=f"Bad URLs of each kind: {', '.join(BAD_URL_KINDS)}.")
@click.option("--duplicates", type=int, default=4, show_default=True, help="Exact duplicate images under other URLs.")
@click.option("--annotated-fraction", "annotated", type=float, default=0.1, show_default=True,
              help="Clean annotated set (other images, several captions each) as a fraction of --images; 0: none.")
# --annotated FRACTION: the old spelling (elsewhere --annotated is the annotated set's path); still parses, hidden
@click.option("--annotated", "old_annotated", type=float, default=None, hidden=True)
@click.option("--captions-per-image", type=int, default=5, show_default=True, help="Captions per annotated image.")
@click.pass_context
def synth(ctx, out, images, noise, noise_kinds, seed, image_size, port, bad_urls_per_kind, duplicates, annotated,
          old_annotated, captions_per_image):
    """Write a LAION-style source Parquet, the images behind its URLs and a ground-truth sidecar."""
    if ctx.invoked_subcommand is not None:
        return
    if not out:
        raise click.UsageError("missing --out DIR (where to write the world)")
    if old_annotated is not None:
        click.echo("capfilt: warning: synth --annotated is an old name; use --annotated-fraction", err=True)
        annotated = old_annotated
    config = WorldConfig(
        images=images,
        seed=seed,
        image_size=image_size,
        noise=noise,
        noise_kinds=tuple(k.strip() for k in noise_kinds.split(",") if k.strip()),
        bad_urls_per_kind=bad_urls_per_kind,
        duplicates=duplicates,
        port=port,
        annotated=annotated,
        captions_per_image=captions_per_image,
    )
    world = make_world(out, config)
    click.echo(
        f"wrote {world['rows']} source rows ({world['images']} images, {world['duplicates']} duplicates, "
        f"{world['bad_urls']} bad URLs; noise ratio {world['noise_ratio']:.3f}) to {out}\n"
        f"source: {world['source']}\nground truth: {world['ground_truth']}\n"
        + (f"annotated: {world['annotated']} ({world['annotated_images']} images, {captions_per_image} clean "
           f"captions each)\n" if "annotated" in world else "")
        + f"serve it with: capfilt synth serve {out}"
    )


@synth.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def serve(directory):
    """Serve a world's URLs on the host and port recorded in it until stopped (Ctrl-C)."""
    world = load_world(directory)
    server = WorldServer(directory)
    click.echo(f"serving {directory} at {server.base_url} ({world['rows']} URLs); Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped")


@synth.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def info(directory):
    """Print a world's description (world.json)."""
    click.echo(json.dumps(load_world(directory), indent=1, sort_keys=True))


@synth.command()
@click.option("--truth", required=True, type=click.Path(exists=True, dir_okay=False), help="The world's ground_truth.parquet.")
@root_option("Data root holding both runs.")
@click.option("--from-run", required=True, help="Run whose ingested images to use.")
@click.option("--run", "run_id", required=True, help="Run to write: curated/ with the true captions.")
def oracle(truth, root, from_run, run_id):
    """Curate a run from ingested images and their TRUE captions (an upper bound for training)."""
    from flows.steps import make

    step = make("synth oracle", {"truth": truth, "root": root, "from_run": from_run, "run": run_id}, where="")
    step.execute(say=click.echo)
