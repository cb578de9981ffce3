"""`capfilt finetune filter|captioner`: BLIP's finetuning on a clean annotated set."""

from __future__ import annotations

import click


def common_options(f):
    options = [
        click.option("--annotated", required=True,
                     help="Clean annotated set: Parquet/JSONL file or folder (local or fsspec URI) with image_id, "
                          "image|image_path|url and captions (list) or caption (one per row)."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder (resumed if it holds one)."),
        click.option("--steps", type=int, default=None, help="Optimizer steps; default: 5 epochs over the finetuning pairs (LAVIS coco_ft)."),
        click.option("--lr", type=float, default=None, help="Peak learning rate; default: the parent checkpoint's / 10 (LAVIS: 1e-4 -> 1e-5)."),
        click.option("--batch-size", type=int, default=32, show_default=True, help="Image-caption pairs per optimizer step."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds training and the split."),
        click.option("--holdout-fraction", type=float, default=0.2, show_default=True,
                     help="Share of the annotated images held out (never trained on) for calibration."),
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else CPU), cpu, cuda, ..."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group()
def finetune():
    """Finetune the filter and the captioner on a clean annotated set (BLIP's CapFilt)."""


@finetune.command(name="filter")
@common_options
@click.option("--stage1", required=True, help="Stage 1 checkpoint to start from (trainer --out, step-* or model/).")
@click.option("--vision", default=None, help="Frozen encoder (default: the one the Stage 1 checkpoint names).")
@click.option("--target-precision", type=float, default=0.9, show_default=True,
              help="Calibrate the ITM threshold on the held-out part to this precision.")
@click.option("--match-prior", type=float, default=0.5, show_default=True,
              help="Share of judged captions assumed to match their image (enters the predicted precision).")
@click.option("--no-calibrate", is_flag=True, help="Finetune only.")
@click.option("--clip", default=None,
              help="The CLIP the filter stage scores with (open_clip name): calibrated on the same held-out pairs too.")
@click.option("--clip-pretrained", default=None, help="Its open_clip pretrained tag or checkpoint file.")
@click.option("--clip-config", type=click.Path(exists=True), default=None, help="Its open_clip model config(s) to register first.")
@click.option("--filter-score", type=click.Choice(["best", "itm", "clip"]), default="best", show_default=True,
              help="The score the calibrated filter thresholds: the finetuned ITM, the CLIP, or (best) whichever "
                   "reaches --target-precision with more recall on the held-out pairs (ITM without --clip).")
@click.option("--folds", type=int, default=1, show_default=True,
              help="Out of fold: train --stage1's recipe again FOLDS times, each without one fold of its run's images, "
                   "finetune each, and score each image with the one that never trained on it (a filter judging "
                   "the pairs it trained on remembers them, noise included, and keeps more than its calibration "
                   "predicts). Costs FOLDS - 1 Stage 1 trainings more.")
def filter_command(**options):
    """Finetune BLIP's filter (ITC + ITM) from a Stage 1 checkpoint, then calibrate its ITM threshold
    (and with --clip the CLIP's) on the held-out part.

    DIR loads as `capfilt filter --itm DIR --policy calibrated` (DIR/calibration.json holds the threshold).
    """
    from flows.steps import make

    return make("finetune filter", options, where="").execute(say=click.echo)


@finetune.command(name="captioner")
@common_options
@click.option("--stage2", required=True, help="Stage 2 checkpoint to start from (trainer --out or step-*).")
def captioner_command(**options):
    """Finetune BLIP's captioner (LM loss) from a Stage 2 checkpoint.

    DIR loads as `capfilt caption --captioner DIR`: the finetuned model, or its parent where
    finetuning lowered CIDEr on the held-out part (model selection, DIR/selected).
    """
    from flows.steps import make

    return make("finetune captioner", options, where="").execute(say=click.echo)
