"""`capfilt filter`: score every (image, caption) pair, dedup the run, select, write the report."""

from __future__ import annotations

import click

from capfilt.commands.options import executor_option, root_option


def filter_options(f):
    """Options shared by `capfilt filter` and `capfilt curate`."""
    options = [
        click.option("--clip", required=True, help="open_clip model name, e.g. ViT-L-14."),
        click.option("--clip-pretrained", help="open_clip pretrained tag (e.g. openai) or a local checkpoint file."),
        click.option("--clip-config", type=click.Path(exists=True), help="JSON model config(s) to register with open_clip first."),
        click.option("--itm", help="ITM model: hub id or save_pretrained folder (BLIP / BLIP-2 ITM, capfilt Stage 1)."),
        click.option("--policy", default="blip2", show_default=True, help="blip, calibrated (BLIP's filter; itm-calibrated is its earlier name), blip2, clip-threshold, clip-top-fraction; comma-separated to combine (e.g. blip,blip2); none: keep every caption that passes the checks."),
        click.option("--caption-sources", default="web,synthetic", show_default=True,
                     help="Caption sources that may be kept (web, synthetic); others are dropped as caption_source_excluded."),
        click.option("--calibration", default=None,
                     help="calibrated: calibration.json or a `capfilt finetune filter` folder (default: the --itm folder's)."),
        click.option("--target-precision", type=float, default=None,
                     help="calibrated: re-pick the threshold on the stored curve for this precision (default: the calibrated one)."),
        click.option("--match-prior", type=float, default=None,
                     help="calibrated: share of captions assumed to match, for the predicted precision (default: the calibrated one)."),
        click.option("--stated-prior", is_flag=True,
                     help="calibrated: judge every caption source at the stated --match-prior; by default a source whose "
                          "own scores say fewer of its captions match gets the stricter threshold for its share."),
        click.option("--top-k", type=int, default=2, show_default=True, help="blip2: captions kept per image."),
        click.option("--rank-by", type=click.Choice(["clip", "itm"]), default="clip", show_default=True,
                     help="blip2: rank an image's captions by CLIP similarity (BLIP-2) or by ITM probability."),
        click.option("--itm-threshold", type=float, default=0.5, show_default=True, help="blip: keep when ITM p >= this."),
        click.option("--clip-threshold", type=float, default=0.3, show_default=True, help="clip-threshold: keep when CLIP score >= this."),
        click.option("--clip-top-fraction", type=float, default=0.3, show_default=True, help="clip-top-fraction: keep the run's top fraction by CLIP score."),
        click.option("--min-image-size", type=int, default=0, show_default=True,
                     help="Drop images whose shorter side has fewer pixels."),
        click.option("--max-aspect-ratio", type=float, default=float("inf"), show_default=True,
                     help="Drop images whose longer side exceeds this many times the shorter side."),
        click.option("--max-punsafe", type=float, help="Drop images whose source punsafe exceeds this."),
        click.option("--max-pwatermark", type=float, help="Drop images whose source pwatermark exceeds this."),
        click.option("--min-caption-words", type=int, default=1, show_default=True, help="Drop captions with fewer words."),
        click.option("--max-caption-words", type=int, default=1000, show_default=True, help="Drop captions with more words."),
        click.option("--keep-degenerate", is_flag=True, help="Do not drop degenerate synthetic captions."),
        click.option("--dedup-eps", type=float, default=0.02, show_default=True, help="Near-duplicates: cosine similarity > 1 - eps."),
        click.option("--dedup-cluster-size", type=int, default=1000, show_default=True, help="Average images per k-means cluster."),
        click.option("--no-semantic-dedup", is_flag=True, help="Only exact (sha256) dedup."),
        click.option("--score-batch-size", type=int, default=64, show_default=True,
                     help="Image-caption pairs per CLIP/ITM forward pass."),
        click.option("--score-actors", type=int, help="Scoring actors (default: one per GPU, else one)."),
        executor_option(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(name="filter")
@root_option()
@click.option("--run", "run_id", required=True, help="Run id.")
@click.option("--from-run", default=None,
              help="Take this run's captions and scores (same images, e.g. both ingested --from-run of one round 0) "
                   "and only dedup and select: an ablation arm that differs in its selection alone.")
@filter_options
def filter_command(**options):
    """Score (CLIP + ITM), dedup (sha256 + SemDeDup with faiss) and select a captioned run.

    Writes scores/, dedup/, curated/ and rejected/ (every dropped caption with its reason) and the
    report (histograms, reasons, sample grid). Each step skips work already done with the same settings.
    """
    from flows.steps import make

    return make("filter", options, where="").execute(say=click.echo)
