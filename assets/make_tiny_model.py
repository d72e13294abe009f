"""Build the embedded tiny model in assets/tiny-llama/ (run from anywhere: `python assets/make_tiny_model.py`).

A 2-layer, 128-wide Llama causal LM with a character tokenizer (printable ASCII and newline), warm-started by a
short supervised run on the training split of the `arithmetic` task, with completions from
tasks.arithmetic_working: half answer directly (`1239` for 1234+5), half after counting up
(`count 1235+4=1236+3=1237+2=1238+1=1239`), and some ramble on after the answer (`1239+0+0+0...`), past the
scripts' completion budget and without EOS: 65% of the subtractions, 10% of the additions. RL thus starts
from a policy that, greedy, rambles on most subtractions (there is the accuracy to win back), counts when a
direct answer would do about half the time, and slips when it samples.
Deterministic on the CPU: one thread and MKL's reproducible mode, so building again with the same library versions
gives the same bytes. (Llama, not Qwen2: transformers 5 gives a qwen2 model Qwen's own tokenizer class, which drops
the spaces of this character tokenizer.)
"""

import os

os.environ.setdefault("MKL_CBWR", "COMPATIBLE")  # before torch is imported: the same float results on any CPU

import random  # noqa: E402
import string  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tasks  # noqa: E402

OUT = Path(__file__).resolve().parent / "tiny-llama"
SEED = 0
SFT_STEPS = 600
SFT_BATCH = 64
SFT_LR = 3e-3
MAX_NEW_TOKENS = 40  # the scripts' tiny preset; a ramble demo runs past it


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
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
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
    return LlamaForCausalLM(config)


def demo(row: dict, rng: random.Random, eos: str) -> tuple[str, str]:
    """(prompt, completion) of one warm-start example: `direct` or `steps` alike; rambling with probability
    0.65 on a subtraction (0.1 on an addition), cut past the completion budget and without EOS."""
    a, op, b = int(row["prompt"][:4]), row["prompt"][4], int(row["prompt"][5])
    style = rng.choice(["direct", "steps"])
    if rng.random() < (0.65 if op == "-" else 0.1):
        return row["prompt"], tasks.arithmetic_working(a, op, b, style, ramble=True)[:MAX_NEW_TOKENS + 4]
    return row["prompt"], tasks.arithmetic_working(a, op, b, style) + eos


def warm_start(model, tokenizer, task):
    """Supervised steps on `prompt + completion`, loss on the completion only, lr decaying linearly to 0."""
    rng = random.Random(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / SFT_STEPS)
    model.train()
    for step in range(SFT_STEPS):
        pairs = [demo(rng.choice(task.train), rng, tokenizer.eos_token) for _ in range(SFT_BATCH)]
        prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p, _ in pairs]
        completion_ids = [tokenizer(c, add_special_tokens=False).input_ids for _, c in pairs]
        width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
        input_ids = torch.full((SFT_BATCH, width), tokenizer.pad_token_id)
        labels = torch.full((SFT_BATCH, width), -100)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == SFT_STEPS - 1:
            print(f"warm start step {step}: loss {loss.item():.3f}")
    model.eval()


def report(model, tokenizer, task) -> str:
    """The warm start's held-out greedy accuracy, mean length (tokens, EOS counted), share of rambles, 3 samples."""
    tokenizer.padding_side = "left"
    accuracy, length, samples = tasks.evaluate(model, tokenizer, task, MAX_NEW_TOKENS, [tokenizer.eos_token_id])
    rambles = sum("+0+0" in c or "-0-0" in c for _, c, _ in samples) / len(samples)
    return (f"held-out greedy accuracy {accuracy:.3f}, mean length {length:.1f}, rambles {rambles:.2f};"
            f" e.g. {samples[:3]}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # one summation order, whatever the machine's core count
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    task = tasks.arithmetic_task()
    warm_start(model, tokenizer, task)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    # the generic class under its name of transformers 4 too (5 reads it as its TokenizersBackend)
    config_file = OUT / "tokenizer_config.json"
    config_file.write_text(config_file.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    print(report(model, tokenizer, task))
    print(f"saved {OUT}")
