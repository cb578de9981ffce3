"""`capfilt eval`: retrieval, captioning, attribute and filter metrics of a run, as JSON and a table."""

from __future__ import annotations

import click

from capfilt.commands.options import NEW_TOKENS, Command, root_option

from flows.steps.evaluate import METRICS_FILE, metrics_path  # noqa: F401 - metrics_path: the CLI's rule too


@click.command("eval", cls=Command, renamed=NEW_TOKENS)
@root_option()
@click.option("--run", required=True, help="Run to evaluate: its filter quality, and its images when no Stage 1 holdout exists.")
@click.option("--stage1", help="Stage 1 checkpoint (trainer --out folder, step-* or model folder): retrieval R@1/5/10.")
@click.option("--captioner", help="Captioner folder or hub id (load_captioner): BLEU-4, CIDEr, attribute accuracy.")
@click.option("--truth", type=click.Path(dir_okay=False), help="A synthetic world's ground_truth.parquet: clean references, attribute and filter metrics.")
@click.option("--heldout", type=click.Path(exists=True, file_okay=False),
              help="A synthetic world folder no model trained on: the clean evaluation set (true captions).")
@click.option("--clip-config", type=click.Path(exists=True), help="open_clip model config(s) to register first (a toy CLIP the Stage 1 checkpoint names).")
@click.option("--max-images", type=int, default=200, show_default=True, help="Evaluation images at most (seeded sample).")
@click.option("--preset", type=click.Choice(["lavis"]), default=None,
              help="LAVIS's defaults: retrieval re-ranks the ITC top 128 by ITM logit + ITC similarity; captions with "
                   "beam 5, max 30, min 8. Options given explicitly win.")
@click.option("--rerank-k", type=int, default=None, help="Retrieval: ITC top-k re-ranked by ITM (default 16).")
@click.option("--rerank-score", type=click.Choice(["itm+itc", "itm"]), default=None,
              help="Retrieval re-ranking score: ITM logit + ITC similarity (LAVIS, default) or the ITM logit alone.")
@click.option("--num-beams", type=int, default=None, help="Captioning: beam width, one caption per image (default 3).")
@click.option("--max-new-tokens", "max_length", type=int, default=None, help="Captioning: most generated tokens (default 30).")
@click.option("--min-new-tokens", "min_length", type=int, default=None, help="Captioning: fewest generated tokens (default 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sample of evaluation images.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option("--out", "out", required=True, type=click.Path(),
              help=f"Folder to write the metrics to ({METRICS_FILE}); a path ending in .json (the old form) is the file itself.")
def eval_command(out, **options):
    """Measure a run: retrieval (--stage1), captions (--captioner) and, on a synthetic world (--truth), filter quality."""
    from flows.steps import make

    make("eval", {**options, "out": out}, where="").execute(say=click.echo)
