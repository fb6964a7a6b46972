"""Step 5 of examples/rlhf: answer the 500 held-out hh-rlhf prompts with the SFT, RL and DPO adapters
(greedy, the same token budget RL trained with), judge every answer with the reward model, and
print and save the comparison: mean reward, and the share of prompts where each beats SFT.

Run:  .venv/bin/python examples/rlhf/compare.py      (after the four recipes; bash examples/rlhf/run.sh runs all)
Answers are cached in runs/rlhf/compare/, so a rerun only scores again.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1].parent / "shared" / "data" / "hh_rlhf_harmless" / "test.jsonl"


def answer_all(name: str, folder: Path, prompts: list, cache: Path, max_new_tokens: int, batch_size: int, progress) -> list[str]:
    """Greedy answers, cached per prompt (a rerun answers only the missing ones). Prompts go in batches of
    similar length, shortest first, so a batch pads little."""
    from tunesmith.adapters import load_trained
    from tunesmith.generate import chat_prompt_ids, generate_batch

    path = cache / f"{name}.jsonl"
    done: dict[int, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[row["index"]] = row["answer"]
    missing = [i for i in range(len(prompts)) if i not in done]
    if missing:
        model, tokenizer = load_trained(folder)
        missing.sort(key=lambda i: len(chat_prompt_ids(tokenizer, prompts[i])))
        task = progress.add_task(f"answering with {name}", total=len(prompts), completed=len(done))
        with path.open("a", encoding="utf-8") as handle:
            for start in range(0, len(missing), batch_size):
                picked = missing[start : start + batch_size]
                answers = generate_batch(model, tokenizer, [prompts[i] for i in picked], max_new_tokens, batch_size)
                handle.write("".join(json.dumps({"index": i, "answer": a}) + "\n" for i, a in zip(picked, answers)))
                handle.flush()
                done.update(zip(picked, answers))
                progress.update(task, completed=len(done))
    return [done[i] for i in range(len(prompts))]


def main() -> None:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from tunesmith.data.prompts import read_prompts
    from tunesmith.files import write_text_atomic
    from tunesmith.rewards import load_reward_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/rlhf"))
    parser.add_argument("--prompts", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    console = Console(highlight=False)
    prompts = read_prompts(args.prompts)[: args.limit]
    cache = args.runs / "compare"
    cache.mkdir(parents=True, exist_ok=True)
    models = {"SFT": args.runs / "sft", "RL (GRPO)": args.runs / "rl", "DPO": args.runs / "dpo"}
    started = time.perf_counter()
    answers = {}
    with Progress(console=console) as progress:
        for name, folder in models.items():
            answers[name] = answer_all(name.split()[0].lower(), folder, prompts, cache, args.max_new_tokens,
                                       args.batch_size, progress)
        judge = load_reward_model(args.runs / "reward", batch_size=16)
        scores = {}
        task = progress.add_task("scoring with the reward model", total=len(answers))
        for name, replies in answers.items():  # all of a model's answers at once: batched by length, little padding
            scores[name] = judge.score([p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, replies)])
            progress.advance(task)

    def mean(xs):
        return sum(xs) / len(xs)

    def stderr(xs):
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    rows = []
    for name in models:
        s, base = scores[name], scores["SFT"]
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(s, base)) / len(s)
        rows.append({"model": name, "mean_reward": round(mean(s), 4), "stderr": round(stderr(s), 4),
                     "beats_sft": None if name == "SFT" else round(wins, 4),
                     "identical_to_sft": sum(a == b for a, b in zip(answers[name], answers["SFT"])),
                     "mean_words": round(mean([len(a.split()) for a in answers[name]]), 1)})
    reward_summary = json.loads((args.runs / "reward" / "summary.json").read_text())
    table = Table(title=f"hh-rlhf harmless, {len(prompts)} held-out prompts, judged by the reward model "
                        f"(held-out pair accuracy {reward_summary['accuracy_after']:.3f})")
    for column in ("model", "mean reward ± s.e.", "beats SFT", "answers identical to SFT", "mean words"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['mean_reward']:+.4f} ± {r['stderr']:.4f}",
                      "-" if r["beats_sft"] is None else f"{r['beats_sft']:.1%}", str(r["identical_to_sft"]),
                      f"{r['mean_words']}")
    console.print(table)
    result = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": rows,
              "reward_model": {k: reward_summary[k] for k in ("accuracy_before", "accuracy_after", "margin_after",
                                                               "heldout_pairs", "train_pairs")},
              "seconds": round(time.perf_counter() - started, 1)}
    for stage in ("sft", "reward", "rl", "dpo"):
        summary = json.loads((args.runs / stage / "summary.json").read_text())
        result[f"{stage}_train_seconds"] = summary.get("train_seconds")
    examples = [{"prompt": prompts[i][-1]["content"], **{name: answers[name][i] for name in models},
                 **{f"reward {name}": round(scores[name][i], 3) for name in models}} for i in range(3)]
    result["examples"] = examples
    write_text_atomic(args.out / "results.json", json.dumps(result, indent=2) + "\n")
    lines = ["| model | mean reward ± s.e. | beats SFT | answers identical to SFT | mean words |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['mean_reward']:+.4f} ± {r['stderr']:.4f} | "
              f"{'-' if r['beats_sft'] is None else format(r['beats_sft'], '.1%')} | {r['identical_to_sft']} | {r['mean_words']} |"
              for r in rows]
    write_text_atomic(args.out / "results.md", "\n".join(lines) + "\n")
    console.print(f"saved {args.out / 'results.json'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
