"""`capfilt train stage1|stage2`: train Stage 1 (ITC + ITM + ITG), then Stage 2 (frozen LLM), on a curated run."""

from __future__ import annotations

import click

from capfilt.commands.options import Command, root_option


def run_options(f):
    """Options both trainers share: seed, device, workers, logging, checkpoints, resume."""
    options = [
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds initialisation, data order and augmentation."),
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ..."),
        click.option("--workers", type=int, default=1, show_default=True, help="Ray Train workers (DDP) when > 1."),
        click.option("--data-workers", type=int, default=0, show_default=True, help="DataLoader processes per trainer."),
        click.option("--log-every", type=int, default=10, show_default=True, help="Optimizer steps between metrics.jsonl lines."),
        click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Optimizer steps between checkpoints."),
        click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from the newest checkpoint in --out."),
        click.option("--stop-at", type=int, default=None, help="Stop after this optimizer step (the schedule still spans --steps); default: run all --steps."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def training_options(f):
    """Options both trainers share: steps, batch, optimizer, precision, augmentation, held-out images."""
    options = [
        click.option("--steps", type=int, default=10_000, show_default=True, help="Optimizer steps in all (the LR schedule spans them)."),
        click.option("--batch-size", type=int, default=32, show_default=True, help="Image-text pairs per worker and micro-step."),
        click.option("--grad-accumulation", type=int, default=1, show_default=True, help="Micro-steps per optimizer step."),
        click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate (AdamW, after warmup)."),
        click.option("--weight-decay", type=float, default=0.05, show_default=True, help="AdamW weight decay."),
        click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
                     help="Autocast dtype on GPU (CPU runs fp32)."),
        click.option("--activation-checkpointing/--no-activation-checkpointing", default=False, show_default=True,
                     help="Recompute activations in the backward pass: less GPU memory, more time."),
        click.option("--augment/--no-augment", default=True, show_default=True, help="Random resized crop and flip."),
        click.option("--flip/--no-flip", default=True, show_default=True, help="Horizontal flip (swaps left/right in captions)."),
        click.option("--cache-features/--no-cache-features", default=False, show_default=True,
                     help="Compute frozen features once per image (needs --no-augment)."),
        click.option("--holdout-images", type=int, default=0, show_default=True, help="Images kept out of training for evaluation."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def recipe_options(f):
    """--recipe and the rows it sets (model/recipes.py); a row given explicitly overrides the recipe."""
    row = "default: from --recipe"
    options = [
        click.option("--recipe", type=click.Choice(["paper", "lavis"]), default="paper", show_default=True,
                     help="paper: the BLIP-2 paper's recipe; lavis: what salesforce/LAVIS's code does (README: Recipes)."),
        click.option("--min-lr", type=float, default=None, help=f"Learning rate the cosine ends at ({row}: 1e-5; Stage 2 paper 5e-5)."),
        click.option("--warmup-steps", type=int, default=None, help=f"Linear warmup steps ({row}: paper 2000, lavis 5000 Stage 1 / 2000 Stage 2)."),
        click.option("--warmup-lr", type=float, default=None, help=f"LR at warmup's first step; 0 ramps from lr/warmup ({row}: paper 0, lavis 1e-6)."),
        click.option("--lr-schedule", type=click.Choice(["cosine-step", "cosine-epoch"]), default=None,
                     help=f"Cosine per optimizer step, or LAVIS's per epoch after an epoch-0 warmup ({row})."),
        click.option("--beta2", type=float, default=None, help=f"AdamW beta2 ({row}: paper 0.98, lavis 0.999)."),
        click.option("--grad-clip", type=float, default=None, help=f"Max gradient norm, 0 = none ({row}: paper 1.0, lavis 0)."),
        click.option("--text-processing", type=click.Choice(["tokenizer", "pre_caption"]), default=None,
                     help=f"Captions as curated, or LAVIS's pre_caption: lowercase, punctuation stripped, 50 words ({row})."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group()
def train():
    """Train capfilt's models on a curated run."""


@train.command(cls=Command, renamed={"--from-run": "--run"})
@root_option("Data root (local path or fsspec URI) holding runs/<run>/curated.")
@click.option("--run", "run_id", required=True,
              help="Run whose curated/ pairs to train on; its lineage (models, thresholds) is recorded in the checkpoint.")
@click.option("--vision", required=True, help="Frozen encoder: open_clip:<name>@<tag|checkpoint>, or a transformers id/folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder (resumed from if it holds one).")
@click.option("--tokenizer", default="bert-base-uncased", show_default=True, help="BERT tokenizer id or folder.")
@click.option("--bert", default="bert-base-uncased", show_default=True, help="BERT checkpoint to initialise from; 'none' for random init.")
@click.option("--model-config", default=None,
              help="Q-Former architecture: a name (qformer-base, qformer-toy), a JSON file, or a JSON object of "
                   "config fields, e.g. '{\"num_hidden_layers\": 2}'; default: qformer-base (BLIP-2's).")
@training_options
@click.option("--itm-random-negative-steps", type=int, default=0, show_default=True,
              help="ITM negatives drawn uniformly for this many steps before hard negatives (training from scratch).")
@click.option("--itc-gather-grad", type=click.Choice(["local", "none"]), default=None,
              help="ITC: the local slice of the gathered batch keeps its gradient (paper), or no gradient through the gather (lavis).")
@recipe_options
@run_options
def stage1(**params):
    """Train Stage 1 (ITC + ITM + ITG) against a frozen image encoder; checkpoints and metrics go to --out."""
    from flows.steps import make

    return make("train stage1", params, where="").execute(say=click.echo)


@train.command(cls=Command)
@root_option("Data root (local path or fsspec URI) holding runs/<run>/curated.")
@click.option("--run", "run_id", required=True, help="Run whose curated/ pairs to train on.")
@click.option("--stage1", required=True, type=click.Path(exists=True, file_okay=False), help="Stage 1 checkpoint: its --out folder, a step-* folder or model/.")
@click.option("--llm", required=True, help="Frozen LLM: hub id or folder (AutoModelForCausalLM, e.g. OPT; or Flan-T5/T5) with its tokenizer.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder (resumed from if it holds one).")
@click.option("--vision", default=None, help="Frozen encoder; default: the one named in the Stage 1 checkpoint's stage1.json.")
@click.option("--prompt", default="", show_default=True, help="Text before every caption (no loss on it), e.g. 'a photo of'.")
@click.option("--instruction-aware/--no-instruction-aware", default=False, show_default=True, help="InstructBLIP: the prompt also enters the Q-Former.")
@click.option("--max-text-length", type=int, default=32, show_default=True, help="Most LLM tokens per caption (eos included).")
@training_options
@click.option("--llm-train-mode/--llm-eval-mode", default=None,
              help="Frozen LLM in train mode, dropout on (lavis), or eval mode (paper); default: from --recipe.")
@click.option("--caption-end", type=click.Choice(["eos", "newline"]), default=None,
              help="A decoder-only LLM's caption ends with its eos token (paper) or '\\n' (lavis, as Salesforce's OPT "
                   "checkpoints); T5 always ends with eos. Default: from --recipe.")
@recipe_options
@run_options
def stage2(**params):
    """Train Stage 2: the Stage 1 Q-Former and a projection in front of a frozen LLM; checkpoints go to --out."""
    from flows.steps import make

    return make("train stage2", params, where="").execute(say=click.echo)
