"""The model learns to stop: EOS (here <|im_end|>) is in the labels, so an overfit tiny model ends its answer."""

from conftest import write_jsonl, write_recipe
from stages.helpers import train
from tunesmith.adapters import load_trained
from tunesmith.generate import chat_prompt_ids, generate_reply


def test_tiny_model_learns_to_stop_at_eos(tmp_path):
    rows = [{"instruction": "Greet me.", "input": "", "output": "Hello friend"}] * 8
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = write_recipe(tmp_path, tuning={"method": "full"})
    train(recipe, ["training.max_steps=40", "training.learning_rate=0.01", "training.micro_batch_size=4",
                   "data.validation_fraction=0"])
    model, tokenizer = load_trained(tmp_path / "out", device="cpu")
    messages = [{"role": "user", "content": "Greet me."}]
    answer = generate_reply(model, tokenizer, messages, max_new_tokens=20)
    assert answer == "Hello friend"
    # it stopped because it produced <|im_end|>, not because it ran out of tokens
    import torch

    ids = torch.tensor([chat_prompt_ids(tokenizer, messages)])
    out = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 20
