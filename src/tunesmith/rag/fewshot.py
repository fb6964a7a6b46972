"""In-context learning: few-shot prompts whose examples are the ones most similar to the query.

Examples come from a labelled set (classification: text -> label) or an instruction set
(prompt -> response); similarity is cosine over the retrieval encoder's embeddings, computed
once per example set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunesmith.rag.embed import TextEncoder


@dataclass
class Example:
    input: str
    output: str


class FewShot:
    def __init__(self, examples: list[Example], encoder: TextEncoder) -> None:
        if not examples:
            raise ValueError("few-shot selection needs at least one example")
        self.examples, self.encoder = examples, encoder
        self.vectors = encoder.embed([e.input for e in examples])

    def select(self, query: str, k: int, exclude_same: bool = True) -> list[Example]:
        """The k most similar examples, most similar last (nearest the question in the prompt)."""
        scores = self.vectors @ self.encoder.embed_one(query)
        order = np.argsort(-scores, kind="stable")
        picked = [i for i in order if not (exclude_same and self.examples[i].input == query)][:k]
        return [self.examples[i] for i in reversed(picked)]

    def messages(self, query: str, k: int, instruction: str | None = None) -> list[dict[str, str]]:
        """Chat messages: an optional system instruction, then each example as a user/assistant turn, then the query."""
        out = [{"role": "system", "content": instruction}] if instruction else []
        for example in self.select(query, k):
            out += [{"role": "user", "content": example.input}, {"role": "assistant", "content": example.output}]
        return out + [{"role": "user", "content": query}]


def read_examples(path) -> list[Example]:
    """Demonstrations from a file: classification rows (text, label), alpaca rows, or chats (first user and
    assistant turns)."""
    from tunesmith.data.formats import read_rows
    from tunesmith.errors import TunesmithError

    examples = []
    for row in read_rows(path):
        value = row.value
        if not isinstance(value, dict):
            raise TunesmithError(f"{row.path}:{row.line}: expected an object")
        if "text" in value and "label" in value:
            examples.append(Example(str(value["text"]), str(value["label"])))
        elif "instruction" in value and "output" in value:
            prompt = value["instruction"] + (f"\n\n{value['input']}" if value.get("input") else "")
            examples.append(Example(prompt, str(value["output"])))
        elif isinstance(value.get("messages"), list):
            user = next((m.get("content") for m in value["messages"] if m.get("role") == "user"), None)
            reply = next((m.get("content") for m in value["messages"] if m.get("role") == "assistant"), None)
            if user is None or reply is None:
                raise TunesmithError(f"{row.path}:{row.line}: messages: needs a user and an assistant turn")
            examples.append(Example(user, reply))
        else:
            raise TunesmithError(f"{row.path}:{row.line}: expected text+label, instruction+output, or messages")
    return examples
