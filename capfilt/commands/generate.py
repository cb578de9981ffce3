"""`capfilt generate`: captions (or VQA answers) for image files from a Stage 2 checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from capfilt.commands.options import Command


@click.command(cls=Command, renamed={"--checkpoint": "--stage2"})
@click.option("--stage2", required=True,
              help="Stage 2 checkpoint (train stage2's --out, step-* or model folder) or a transformers BLIP-2 id/folder.")
@click.argument("images", nargs=-1, metavar="IMAGE...", type=click.Path(exists=True, dir_okay=False))
# --images FILE: the old spelling (elsewhere --images is a count of images); still parses, hidden
@click.option("--images", "old_images", multiple=True, hidden=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--question", default=None, help="Ask this question about every image (prompt 'Question: {} Answer:').")
@click.option("--prompt", default=None, help="Caption prompt, e.g. 'a photo of'; default: the one it was trained with.")
@click.option("--preset", type=click.Choice(["lavis-caption", "lavis-vqa"]), default=None,
              help="LAVIS's defaults: caption (beam 5, max 30, min 8) or VQA ('Question: {} Short answer:', beam 5, "
                   "max 10, length penalty -1 for T5, 0 for OPT). Options given explicitly win.")
@click.option("--num-beams", type=int, default=None, help="Default 5.")
@click.option("--max-new-tokens", type=int, default=None, help="Default 30 for captions, 10 for answers.")
@click.option("--min-new-tokens", type=int, default=None, help="Default 1.")
@click.option("--length-penalty", type=float, default=None, help="Beam search: score / length**penalty (default 1).")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling instead of beam search (seeded, per image).")
@click.option("--seed", type=int, default=0, show_default=True, help="With --top-p: same seed, same captions.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per generate call.")
@click.option("--vision", default=None, help="Override the checkpoint's image encoder.")
@click.option("--llm", default=None, help="Where the frozen LLM is now, if it moved since training (id or folder).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else CPU), cpu, cuda, ...")
def generate(stage2, images, old_images, question, prompt, preset, num_beams, max_new_tokens, min_new_tokens,
             length_penalty, top_p, seed, batch_size, vision, llm, device):
    """Print one line per IMAGE file: the path, a tab, and the caption (or answer)."""
    from capfilt.errors import ConfigError
    from model.recipes import GENERATE_PRESETS, preset_values
    from model.blip2_generate import VQA_PROMPT, Stage2Generator

    if question is not None and prompt is not None:
        raise ConfigError("--question and --prompt exclude each other: a question sets the prompt.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}.")
    if preset == "lavis-vqa" and question is None:
        raise ConfigError("--preset lavis-vqa needs --question.")
    if old_images:
        click.echo("capfilt: warning: generate --images is an old spelling; list the image files after the options", err=True)
    paths = list(old_images) + list(images)
    if not paths:
        raise click.UsageError("no image files: capfilt generate --stage2 CKPT A.jpg [B.jpg ...]")
    generator = Stage2Generator.from_checkpoint(stage2, vision=vision, llm=llm, device=device)
    given = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                 length_penalty=length_penalty)
    defaults = dict(num_beams=5, max_new_tokens=10 if question is not None else 30, min_new_tokens=1,
                    length_penalty=1.0, vqa_template=VQA_PROMPT)
    opts = preset_values(GENERATE_PRESETS, preset, given, defaults)
    if isinstance(opts["length_penalty"], dict):  # per LLM kind
        opts["length_penalty"] = opts["length_penalty"][generator.model.config.llm_kind]
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        data = [Path(p).read_bytes() for p in chunk]
        if question is not None:
            texts = generator.answer(data, [question] * len(data), num_beams=opts["num_beams"],
                                     max_new_tokens=opts["max_new_tokens"], template=opts["vqa_template"],
                                     min_new_tokens=opts["min_new_tokens"], length_penalty=opts["length_penalty"])
        else:
            # seeds count from the first image of the whole call, so batching never changes a caption
            texts = generator.caption(data, prompt=prompt, num_beams=opts["num_beams"],
                                      max_new_tokens=opts["max_new_tokens"], min_new_tokens=opts["min_new_tokens"],
                                      top_p=top_p, seed=seed, first_index=start, length_penalty=opts["length_penalty"])
        for path, text in zip(chunk, texts):
            click.echo(f"{path}\t{text}")
