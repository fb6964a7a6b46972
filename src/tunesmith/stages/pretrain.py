"""Continued pre-training on raw domain text, packed into blocks; perplexity before and after.

    tunesmith train examples/pretrain_medical.yaml

Documents are tokenised, closed with EOS, concatenated and cut into blocks of
training.max_length. Position ids restart at each document, so no token attends across
a document edge. Every token is a target.
"""

from __future__ import annotations

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.data.render import length_stats, pack_blocks, render
from tunesmith.stages.common import check_output_dir, format_rows, load_split, open_base, shared_rows, train_causal_lm


def run(recipe: Recipe, console: Console, resume: bool = False, overwrite: bool = False) -> dict:
    # 1. Check everything before touching the output folder.
    check_output_dir(recipe, resume, overwrite)
    split = load_split(recipe)
    base = open_base(recipe)
    block = recipe.training.max_length

    # 2. Tokenise whole documents (no truncation: blocks cut them) and pack into blocks.
    def build():
        samples = [render(base.tokenizer, e) for e in split.train]
        eval_samples = [render(base.tokenizer, e) for e in split.validation]
        return pack_blocks(samples, block), pack_blocks(eval_samples, block), length_stats(samples, block)

    rows, eval_rows, stats = shared_rows(recipe, build)  # several processes: tokenised once
    console.print(
        f"data: {len(split.train):,} train / {len(split.validation):,} validation documents; skipped {split.skipped}; "
        f"train {format_rows(rows)} in blocks of {block}"
    )

    # 3. Train; the summary carries perplexity before and after.
    summary = {"train_examples": len(split.train), "validation_examples": len(split.validation),
               "skipped_rows": split.skipped, "lengths": stats, "block_size": block}
    return train_causal_lm(recipe, base, rows, eval_rows, console, resume, overwrite, summary)
