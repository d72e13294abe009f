"""The GPU path, checked on the CPU: bf16 compute over fp32 weights (FSDP2 with a process group of one), bounded
forward passes, and the `paper` preset run small on Qwen2.5-0.5B's shapes."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import grpo
import ppo
from test_scripts import ROOT, run

CPU = torch.device("cpu")


@pytest.fixture
def bf16_tiny():
    """The tiny model with bf16 compute (sharded over a process group of one); the group is closed afterwards."""
    model = common.load_model("tiny", CPU, torch.bfloat16)
    yield model, common.load_tokenizer("tiny")
    common.finish_distributed()


def test_bf16_weights_stay_fp32_and_generation_attends_over_bf16_keys_and_values(bf16_tiny, monkeypatch):
    model, tokenizer = bf16_tiny
    assert common.is_sharded(model) and all(p.dtype == torch.float32 for p in model.parameters())
    seen, original = [], F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)
    torch.manual_seed(0)
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 2, 6, 3.0, common.eos_token_ids(model, tokenizer))
    assert len(seen) >= 2 * 2  # 2 layers, a prefill and at least one decoding step
    assert set(seen) == {(torch.bfloat16,) * 3}
    # the log-probs and the entropy stay fp32 whatever the compute dtype
    logp, entropy = common.completion_logprobs(model, rollout, 1.0, with_entropy=True)
    assert logp.dtype == entropy.dtype == torch.float32 and rollout.entropy.dtype == torch.float32


def test_bf16_logprobs_are_close_to_fp32(bf16_tiny):
    # the same weights in bf16 compute: log-probs agree with fp32 to bf16's precision, and their gradient reaches
    # the fp32 master weights. This model's logits reach 8-16, where bf16's spacing is 2^-4 = 0.0625; a log-prob
    # is a logit minus a logsumexp, each a few roundings off: 0.25 = 4 spacings (a shifted position or a wrong
    # temperature is off by whole units)
    model, tokenizer = bf16_tiny
    reference = common.load_model("tiny", CPU)
    torch.manual_seed(0)
    rollout = common.generate(reference, tokenizer, ["1+2=", "13+45="], 2, 4, 1.0, common.eos_token_ids(model, tokenizer))
    with torch.no_grad():
        expected, _ = common.completion_logprobs(reference, rollout, 1.0)
    logp, _ = common.completion_logprobs(model, rollout, 1.0)
    mask = rollout.completion_mask
    assert ((logp - expected).abs() * mask).max() < 0.25
    (logp * mask).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


class RowCounter:
    """The largest number of rows any forward of the backbone saw, inside `common.generate` and outside it."""

    def __init__(self, monkeypatch):
        self.inside = self.outside = 0
        self.generating = False
        generate = common.generate

        def counted_generate(*args, **kwargs):
            self.generating = True
            try:
                return generate(*args, **kwargs)
            finally:
                self.generating = False

        monkeypatch.setattr(common, "generate", counted_generate)
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        if isinstance(module, torch.nn.Embedding) and inputs:  # every backbone forward embeds its input ids first
            rows = inputs[0].shape[0]
            if self.generating:
                self.inside = max(self.inside, rows)
            else:
                self.outside = max(self.outside, rows)


@pytest.mark.parametrize("script, fields", [
    # 2 epochs: the old log-prob pass runs; beta > 0: the reference pass runs; 4 prompts x 16 = 64 rows
    (grpo, dict(num_prompts=4, update_epochs=2, beta=0.04)),
    # the critic's values, the old and reference log-probs, 4 epochs; 64 prompts x 1 = 64 rows
    (ppo, dict(num_prompts=64)),
])
def test_no_forward_outside_generation_sees_more_rows_than_the_micro_batch(script, fields, monkeypatch):
    counter = RowCounter(monkeypatch)
    try:
        script.main(script.Args(num_steps=1, eval_every=0, micro_batch_size=8, eval_batch_size=5, max_new_tokens=8,
                                 **fields))
    finally:
        counter.handle.remove()
    assert counter.inside == 64  # generation samples the whole rollout batch at once (evaluation: 5 prompts)
    assert counter.outside == 8


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def qwen_shape(tmp_path_factory):
    """Qwen2.5-0.5B's shapes (hidden 896, 14 heads, 2 KV heads, vocabulary 151,936, tied embeddings) with 2 layers,
    randomly initialised, and the tiny model's character tokenizer with a chat template."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("qwen-shape")
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(common.TINY_MODEL)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_paper_preset_in_bf16_on_qwen_shapes(qwen_shape, tmp_path):
    # the `paper` preset (beta 0.04 with its reference model, lr 1e-6, micro-batches) on GSM8K-format rows with the
    # chat template, 2 steps of 2 prompts x 4 completions of up to 64 new tokens in micro-batches of 4
    data = ROOT / "tests" / "data" / "gsm8k_sample.jsonl"
    result = run("grpo.py", "--model", str(qwen_shape), "--task", f"gsm8k:{data}", "--precision", "bf16",
                 "--num-steps", "2", "--max-new-tokens", "64", "--micro-batch-size", "4", "--num-prompts", "2",
                 "--group-size", "4", "--save-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preset=paper" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / common.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    # step 1's KL is taken before its update, between two copies of the initial weights: only bf16 rounding tells
    # them apart, log-ratios of a few hundredths at most, and k3 = e^x - x - 1 is about x^2 / 2 < 1e-3 there
    assert 0 <= rows[1]["loss/kl"] < 1e-3 and rows[2]["completion/mean_length"] > 0
    from transformers import AutoModelForCausalLM

    for dtype in (torch.bfloat16, torch.float32):
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "step_2", dtype=dtype)
        assert all(p.dtype == dtype and p.isfinite().all() for p in saved.parameters())
