"""Supervised / instruction fine-tuning: loss on the responses only.

    tunesmith train examples/sft_lora.yaml

Reads alpaca or chat data, renders it through the model's chat template with
response-only labels (end-of-turn token included), optionally packs samples into rows
without cross-sample attention, trains, and shows one answer before and after.
"""

from __future__ import annotations

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.data.render import as_rows, length_stats, pack_sequences
from tunesmith.generate import generate_reply
from tunesmith.stages.common import (check_output_dir, format_rows, load_split, open_base, render_all, shared_rows,
                                     train_causal_lm)


def run(recipe: Recipe, console: Console, resume: bool = False, overwrite: bool = False,
        preview_tokens: int = 48) -> dict:
    # 1. Check everything before touching the output folder.
    check_output_dir(recipe, resume, overwrite)
    split = load_split(recipe)
    base = open_base(recipe)
    training = recipe.training

    # 2. Render chats with response-only labels; pack if asked.
    def build():
        samples, truncated, dropped = render_all(base.tokenizer, split.train, training.max_length, recipe.data.overlong)
        eval_samples, _, _ = render_all(base.tokenizer, split.validation, training.max_length, "truncate")
        shape = pack_sequences if training.packing else (lambda s, _: as_rows(s))
        return (shape(samples, training.max_length), shape(eval_samples, training.max_length),
                length_stats(samples, training.max_length), truncated, dropped)

    rows, eval_rows, stats, truncated, dropped = shared_rows(recipe, build)  # several processes: tokenised once
    console.print(
        f"data: {len(split.train):,} train / {len(split.validation):,} validation examples ({split.format}); "
        f"skipped {split.skipped}, truncated {truncated}, dropped {dropped}; train {format_rows(rows)}"
    )

    # 3. Train, with one answer before and after.
    first = split.validation[0] if split.validation else split.train[0]
    prompt_messages = first.messages[: max(i for i, m in enumerate(first.messages) if m["role"] == "assistant")]

    def preview(model):
        answer = generate_reply(model, base.tokenizer, prompt_messages, max_new_tokens=preview_tokens)
        return prompt_messages[-1]["content"], answer

    summary = {"train_examples": len(split.train), "validation_examples": len(split.validation),
               "skipped_rows": split.skipped, "truncated": truncated, "dropped": dropped, "lengths": stats,
               "packing": training.packing}
    return train_causal_lm(recipe, base, rows, eval_rows, console, resume, overwrite, summary,
                           preview if preview_tokens else None)
