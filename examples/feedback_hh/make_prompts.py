"""Prompts for the feedback example: the last human turn of the first N conversations of hh-rlhf (harmless).

    python examples/feedback_hh/make_prompts.py ../shared/data/hh_rlhf_harmless/test.jsonl runs/hh_prompts.jsonl --n 50
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def last_human_turn(transcript: str) -> str:
    turns = re.split(r"\n\nHuman: ", transcript)
    return turns[-1].split("\n\nAssistant:")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="hh_rlhf_harmless JSONL (prompt, chosen, rejected)")
    parser.add_argument("output", type=Path)
    parser.add_argument("--n", type=int, default=50)
    args = parser.parse_args()
    prompts = []
    for line in args.source.read_text(encoding="utf-8").split("\n"):
        if line.strip() and len(prompts) < args.n:
            prompt = last_human_turn(json.loads(line)["prompt"])
            if prompt and prompt not in prompts:
                prompts.append(prompt)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    print(f"wrote {len(prompts)} prompts to {args.output}")


if __name__ == "__main__":
    main()
