"""How a language model answers a test example, the same way for every route that prompts one.

A route differs only in the model (the base, an adapter, a tuned copy) and in what the prompt carries
beside the example: nothing (zero-shot), the most similar training examples as earlier chat turns
(few-shot), or numbered retrieved sources (RAG, hybrid). Answers are then scored per task type:
- classification: every label's log-likelihood as the whole assistant reply (end-of-turn included),
  the most likely label wins (constrained, so a small model cannot answer off the label set);
- instruction: a greedy answer scored against the reference (ROUGE-L F1, token F1), plus the
  reference's loss under the same prompt (eval loss);
- qa_with_documents: a short greedy answer whose first yes/no/maybe is the stated label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tunesmith.errors import TunesmithError
from tunesmith.evaluate.metrics import rouge_l_f1, token_f1
from tunesmith.generate import chat_prompt_ids, generate_batch, stop_token_ids
from tunesmith.rag.evaluate import answer_messages, stated_label

if TYPE_CHECKING:
    from tunesmith.rag.store import Hit

QA_ANSWER_TOKENS = 16


# --- prompts -----------------------------------------------------------------------------------

def query_text(task_type: str, row: dict) -> str:
    """What similarity search uses for a row: the text, the question, or the last user turn."""
    if task_type == "classification":
        return row["text"]
    if task_type == "qa_with_documents":
        return row["question"]
    return next(m["content"] for m in reversed(row["messages"][:-1]) if m["role"] == "user")


def target(task_type: str, row: dict) -> str:
    """The answer a row teaches: its label, its reference reply, or its yes/no/maybe."""
    if task_type == "classification":
        return row["label"]
    if task_type == "qa_with_documents":
        return row["answer"]
    return row["messages"][-1]["content"]


def conversation(task_type: str, row: dict, tokenizer, prompt: str = "", labels: list[str] = (),
                 demos: list[dict] = (), hits: list[Hit] | None = None, context_tokens: int = 768) -> list[dict]:
    """The chat a model answers for `row`: demonstrations as earlier turns, then the row's own turn(s)."""
    from tunesmith.rag.answer import context_block, rag_messages

    turns: list[dict] = []
    for demo in demos:
        turns += [*conversation(task_type, demo, tokenizer, prompt, labels)[-1:],
                  {"role": "assistant", "content": target(task_type, demo)}]
    if task_type == "classification":
        content = prompt.replace("{labels}", ", ".join(labels)).replace("{text}", row["text"])
        if hits:
            context, _ = context_block(hits, tokenizer, context_tokens)
            content = f"Sources:\n{context}\n\n{content}"
        return turns + [{"role": "user", "content": content}]
    if task_type == "qa_with_documents":
        return turns + answer_messages(row["question"], tokenizer, hits, context_tokens)
    head = [dict(m) for m in row["messages"][:-1]]
    if hits:
        last = max(i for i, m in enumerate(head) if m["role"] == "user")
        head[last]["content"] = rag_messages(head[last]["content"], hits, tokenizer, context_tokens)[0][0]["content"]
    system = [m for m in head[:1] if m["role"] == "system"]
    return system + turns + head[len(system):]


# --- classification: constrained choice by label likelihood ------------------------------------------

def reply_ids(tokenizer, model, messages: list[dict], reply: str) -> list[int]:
    """Tokens the chat template puts after the generation prompt for `reply`, up to its end-of-turn token."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise TunesmithError("model: its chat template renders a reply differently from the generation prompt; "
                             "label scoring needs a template where the reply follows the prompt")
    ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    stops = set(stop_token_ids(tokenizer, model))
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    return ids[: end + 1] if end is not None else ids


@torch.no_grad()
def label_logprobs(model, tokenizer, conversations: list[list[dict]], labels: list[str],
                   batch_size: int = 8) -> list[list[float]]:
    """Summed log-probability of each label as the complete reply to each conversation.

    Each batch of prompts runs once (left-padded, KV cache kept); the labels then continue every prompt
    from its cache, so k labels cost one prompt pass, not k."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    replies = [reply_ids(tokenizer, model, conversations[0], label) for label in labels]
    n_labels, width = len(replies), max(len(r) for r in replies)
    label_ids = torch.tensor([r + [pad] * (width - len(r)) for r in replies], device=device)
    label_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies], device=device)
    was_training = model.training
    model.eval()
    scores: list[list[float]] = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [chat_prompt_ids(tokenizer, c) for c in conversations[start : start + batch_size]]
            size, longest = len(prompts), max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            batch = [[float(first[b, r[0]]) for r in replies] for b in range(size)]
            if width > 1:
                cache = out.cache
                cache.batch_repeat_interleave(n_labels)
                lengths = mask.sum(-1).repeat_interleave(n_labels)
                follow = model(input_ids=label_ids.repeat(size, 1),
                               attention_mask=torch.cat([mask.repeat_interleave(n_labels, 0), label_mask.repeat(size, 1)], 1),
                               position_ids=lengths[:, None] + torch.arange(width, device=device)[None],
                               cache=cache, use_cache=False)
                logprobs = torch.log_softmax(follow.logits.float(), dim=-1)
                for b in range(size):
                    for j, r in enumerate(replies):
                        batch[b][j] += sum(float(logprobs[b * n_labels + j, t - 1, r[t]]) for t in range(1, len(r)))
            scores += batch
    finally:
        model.train(was_training)
    return scores


# --- instruction: reference loss under the route's prompt ------------------------------------------

@torch.no_grad()
def reference_losses(model, tokenizer, conversations: list[list[dict]], references: list[str],
                     batch_size: int = 4) -> list[tuple[float, int]]:
    """(summed cross-entropy, tokens) of each reference reply, end-of-turn included, given its prompt.

    Rows are left-padded so every reply ends at the last position; only the reply positions are projected
    to the vocabulary."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    try:
        for start in range(0, len(conversations), batch_size):
            pairs = [(chat_prompt_ids(tokenizer, m), reply_ids(tokenizer, model, m, r)) for m, r in
                     zip(conversations[start : start + batch_size], references[start : start + batch_size])]
            longest = max(len(p) + len(r) for p, r in pairs)
            ids = torch.tensor([[pad] * (longest - len(p) - len(r)) + p + r for p, r in pairs], device=device)
            mask = torch.tensor([[0] * (longest - len(p) - len(r)) + [1] * (len(p) + len(r)) for p, r in pairs],
                                device=device)
            keep = max(len(r) for _, r in pairs) + 1
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           logits_to_keep=keep).logits.float()
            for b, (_, r) in enumerate(pairs):
                predicted = logits[b, keep - len(r) - 1 : keep - 1]  # the positions just before each reply token
                loss = torch.nn.functional.cross_entropy(predicted, torch.tensor(r, device=device), reduction="sum")
                out.append((float(loss), len(r)))
    finally:
        model.train(was_training)
    return out


# --- one call per task type ----------------------------------------------------------------------

def answer_rows(task_type: str, model, tokenizer, rows: list[dict], conversations: list[list[dict]],
                labels: list[str] = (), batch_size: int = 8, max_new_tokens: int = 128) -> list[dict]:
    """One record per test row: what the model answered and the per-example scores."""
    if task_type == "classification":
        scores = label_logprobs(model, tokenizer, conversations, labels, batch_size)
        records = []
        for row, row_scores in zip(rows, scores):
            best = max(range(len(labels)), key=row_scores.__getitem__)
            records.append({"true": row["label"], "predicted": labels[best], "correct": labels[best] == row["label"],
                            "scores": dict(zip(labels, (round(s, 4) for s in row_scores)))})
        return records
    if task_type == "qa_with_documents":
        texts = generate_batch(model, tokenizer, conversations, QA_ANSWER_TOKENS, batch_size)
        return [{"id": row["id"], "true": row["answer"], "answer": text, "predicted": stated_label(text),
                 "correct": stated_label(text) == row["answer"]} for row, text in zip(rows, texts)]
    references = [target(task_type, row) for row in rows]
    texts = generate_batch(model, tokenizer, conversations, max_new_tokens, batch_size)
    losses = reference_losses(model, tokenizer, conversations, references, min(batch_size, 4))
    return [{"reference": ref, "answer": text, "rouge_l": rouge_l_f1(text, ref), "token_f1": token_f1(text, ref),
             "loss_sum": loss, "loss_tokens": tokens} for ref, text, (loss, tokens) in zip(references, texts, losses)]
