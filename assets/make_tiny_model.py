"""Build the embedded tiny model in assets/tiny-qwen2/ (run from anywhere: `python assets/make_tiny_model.py`).

A 2-layer, 128-wide Qwen2-style causal LM with a character tokenizer (printable ASCII and newline),
warm-started by a short supervised run on the training split of the `arithmetic` task so that RL starts
from a policy that answers in the right format but is mostly wrong (about 10% held-out accuracy).
Deterministic on the CPU: the same seed gives the same weights.
"""

import string
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

OUT = Path(__file__).resolve().parent / "tiny-qwen2"
SEED = 0
SFT_STEPS = 80
SFT_BATCH = 32
SFT_LR = 3e-3


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space and newline
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )


def build_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def warm_start(model, tokenizer, task):
    """Supervised steps on `prompt + answer + EOS`, loss on the answer and EOS only."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR)
    model.train()
    for _ in range(SFT_STEPS):
        picks = torch.randint(len(task.train), (SFT_BATCH,), generator=generator).tolist()
        rows = [task.train[i] for i in picks]
        prompt_ids = [tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in rows]
        answer_ids = [tokenizer(str(r["answer"]), add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for r in rows]
        width = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
        input_ids = torch.full((SFT_BATCH, width), tokenizer.pad_token_id)
        labels = torch.full((SFT_BATCH, width), -100)
        for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


if __name__ == "__main__":
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    model = build_model(tokenizer)
    task = common.arithmetic_task()
    warm_start(model, tokenizer, task)
    eos = [tokenizer.eos_token_id]
    accuracy, samples = common.evaluate(model, tokenizer, task, max_new_tokens=4, eos_ids=eos)
    train_task = common.Task("train", [], task.train, task.reward_fn, False)
    train_accuracy, _ = common.evaluate(model, tokenizer, train_task, max_new_tokens=4, eos_ids=eos)
    print(f"held-out greedy accuracy {accuracy:.2f}, train {train_accuracy:.2f}; e.g. {samples[:3]}")
    common.save_checkpoint(model, tokenizer, OUT)
    print(f"saved {OUT}")
