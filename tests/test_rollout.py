"""Rollout plumbing in common.py: completion masks, left padding, chunked log-probs."""

import copy
import functools
import math
import os
import platform
import subprocess
import sys
import weakref

import pytest
import torch

import common


def test_completion_mask_from_positions():
    # EOS id 0 is also the pad id. Rows, by hand:
    #   5 6 0 0 -> EOS at 2: mask 1 1 1 0, length 3
    #   0 0 0 0 -> EOS first (pad == EOS must still train it): 1 0 0 0, length 1
    #   5 6 7 8 -> no EOS: all ones, length 4, truncated
    #   5 0 6 0 -> first EOS at 1: 1 1 0 0, length 2 (the later EOS is ignored)
    #   5 9 6 6 -> 9 is a second EOS id (as chat models have): 1 1 0 0, length 2
    ids = torch.tensor([[5, 6, 0, 0], [0, 0, 0, 0], [5, 6, 7, 8], [5, 0, 6, 0], [5, 9, 6, 6]])
    mask, lengths, truncated = common.completion_mask(ids, eos_ids=[0, 9])
    expected = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert mask.tolist() == expected
    assert lengths.tolist() == [3, 1, 4, 2, 2]
    assert truncated.tolist() == [False, False, True, False, False]


def test_generate_left_pads_and_groups_contiguously(tiny):
    model, tokenizer, eos = tiny
    # "1+2=" is 4 characters, "13+45=" is 6: the first prompt gets 2 pad tokens on the left
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 1.0, eos)
    assert rollout.prompt_len == 6
    assert rollout.completion_ids.shape == (6, 5)
    assert rollout.attention_mask[:3, :6].tolist() == [[0, 0, 1, 1, 1, 1]] * 3
    assert rollout.attention_mask[3:, :6].tolist() == [[1] * 6] * 3
    assert rollout.attention_mask[:, 6:].eq(1).all()
    # rows 0-2 answer prompt 0, rows 3-5 prompt 1
    assert tokenizer.decode(rollout.input_ids[2, 2:6]) == "1+2="
    assert tokenizer.decode(rollout.input_ids[4, :6]) == "13+45="


def naive_logprobs(model, input_ids, attention_mask, prompt_len, temperature):
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, prompt_len - 1 : -1].float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1), logp


def test_chunked_logprobs_equal_full_log_softmax(tiny):
    model, tokenizer, eos = tiny
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 0.7, eos)
    args = (model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 0.7)
    expected, full = naive_logprobs(*args)
    expected_entropy = -(full.exp() * full).sum(-1)
    # chunks of 7 tokens do not divide the 6 x 5 = 30 completion tokens: the last chunk is short
    chunked, entropy = common.completion_logprobs(*args, chunk_size=7, with_entropy=True)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    # and the gradient through the recomputed chunks equals the gradient of the naive computation, for the
    # log-probs and for the entropy (PPO's entropy bonus trains through it)
    model.zero_grad()
    chunked_logp, chunked_entropy = common.completion_logprobs(*args, chunk_size=7, with_entropy=True)
    (chunked_logp.sum() + chunked_entropy.sum()).backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    naive_logp, naive_full = naive_logprobs(*args)
    (naive_logp.sum() - (naive_full.exp() * naive_full).sum()).backward()
    # float32 sums in another order: the entropy's gradient (p * (log p + H)) cancels, so compare whole tensors
    # (in float64 the two agree to 1e-13)
    for got, want in zip(chunked_grads, (p.grad for p in model.parameters())):
        assert (got - want).norm() <= 1e-4 * want.norm()
    assert chunked_logp.requires_grad and chunked_entropy.requires_grad
    # the two prompts ran through the backbone once each (their 3 rows share the KV cache)
    assert common._prompt_group_sizes(model, *args[1:4]).tolist() == [3, 3]


def test_shared_prompts_in_a_micro_batch_that_splits_groups(tiny):
    # rows 1-4 of two groups of 3: prompt 0's last 2 rows, prompt 1's first 2; values and gradients as naive
    model, tokenizer, eos = tiny
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 1.0, eos)
    args = (model, rollout.input_ids[1:5], rollout.attention_mask[1:5], rollout.prompt_len, 1.0)
    assert common._prompt_group_sizes(*args[:4]).tolist() == [2, 2]
    model.zero_grad()
    logp, _ = common.completion_logprobs(*args)
    logp.sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected, _ = naive_logprobs(*args)
    expected.sum().backward()
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(shared_grads, (p.grad for p in model.parameters())):
        assert (got - want).norm() <= 1e-4 * want.norm()  # float32 sums in another order
    model.zero_grad()


def test_prompt_group_sizes_by_hand(tiny):
    # prompts of 2 positions, rows A A B B B A: runs of 2, 3 and 1 (the last A is not next to the first two).
    # Row 5 = A with a different mask (left padding) is another prompt. All rows distinct, or no position after
    # the prompt: None (nothing to share)
    model, _, _ = tiny
    a, b = [5, 6], [5, 7]
    ids = torch.tensor([a + [1], a + [2], b + [3], b + [4], b + [5], a + [6]])
    mask = torch.ones_like(ids)
    assert common._prompt_group_sizes(model, ids, mask, 2).tolist() == [2, 3, 1]
    mask[1, 0] = 0
    assert common._prompt_group_sizes(model, ids, mask, 2).tolist() == [1, 1, 3, 1]
    assert common._prompt_group_sizes(model, ids[[0, 2, 5]], mask[[0, 2, 5]], 2) is None  # A B A
    assert common._prompt_group_sizes(model, ids[:, :2], mask[:, :2], 2) is None
    checkpointed = common.prepare_for_training(copy.deepcopy(model), gradient_checkpointing=True)
    assert common._prompt_group_sizes(checkpointed, ids, mask, 2) is None  # no KV cache to share


def test_token_logprobs_entropy_and_gradients_by_hand():
    # a 2-token vocabulary; hidden [1] through weights [0, 2 ln 3] gives logits [0, 2 ln 3], at temperature 2
    # z = [0, ln 3]: p = [1/4, 3/4]. Entropy H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.3466 + 0.2158 = 0.5623.
    # log p(token 1) = ln 3/4 = -0.2877
    hidden = torch.ones(1, 1, requires_grad=True)
    weight = torch.tensor([[0.0], [2 * math.log(3)]], requires_grad=True)
    logp, entropy = common._TokenLogprobs.apply(hidden, weight, None, torch.tensor([1]), 2.0, 1, True, None, None)
    assert logp.item() == pytest.approx(-0.2877, abs=1e-4)
    assert entropy.item() == pytest.approx(0.5623, abs=1e-4)
    # d logp / dz = e_1 - p = [-1/4, 1/4]; d / dlogits = that / T = [-1/8, 1/8]
    # d weight = dlogits^T hidden = [[-1/8], [1/8]]; d hidden = dlogits . weight = 1/8 * 2 ln 3 = 0.2747
    logp.sum().backward()
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.125], [0.125]]))
    assert hidden.grad.item() == pytest.approx(math.log(3) / 4, abs=1e-6)
    # d H / dz_j = -p_j (log p_j + H): -(1/4)(-1.3863 + 0.5623) = 0.2060 and -(3/4)(-0.2877 + 0.5623) = -0.2060;
    # / T = [0.1030, -0.1030]; d hidden = -0.1030 * 2 ln 3 = -0.2263
    hidden.grad, weight.grad = None, None
    logp, entropy = common._TokenLogprobs.apply(hidden, weight, None, torch.tensor([1]), 2.0, 1, True, None, None)
    entropy.sum().backward()
    torch.testing.assert_close(weight.grad, torch.tensor([[0.1030], [-0.1030]]), atol=1e-4, rtol=0)
    assert hidden.grad.item() == pytest.approx(-0.2263, abs=1e-4)


def test_token_logprobs_gradients_pass_gradcheck():
    # the hand-written backward against finite differences (float64), through every option: 5 tokens in chunks
    # of 2 (the last one short), a bias, temperature 0.7, gradients into both the log-probs and the entropies
    generator = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
                            for shape in [(5, 3), (7, 3), (7,)])
    targets = torch.tensor([0, 6, 3, 3, 1])
    with_entropy = lambda h, w, b: common._TokenLogprobs.apply(h, w, b, targets, 0.7, 2, True, None, None)  # noqa: E731
    assert torch.autograd.gradcheck(with_entropy, (hidden, weight, bias))
    logp_only = lambda h, w: common._TokenLogprobs.apply(h, w, None, targets, 1.3, 3, False, None, None)  # noqa: E731
    assert torch.autograd.gradcheck(logp_only, (hidden, weight))


def test_left_padding_does_not_change_logprobs(tiny):
    model, tokenizer, eos = tiny
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 1, 4, 1.0, eos)
    batched, _ = common.completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 1.0)
    # the padded row 0 alone, without its 2 pad tokens, must score its completion the same
    alone = rollout.input_ids[:1, 2:]
    single, _ = common.completion_logprobs(model, alone, torch.ones_like(alone), 4, 1.0)
    torch.testing.assert_close(batched[:1], single, rtol=1e-5, atol=1e-5)


def test_sampling_ignores_the_models_own_top_k_top_p_and_penalty(tiny):
    model, tokenizer, eos = tiny
    shipped = model.generation_config.to_dict()
    # a generation config like Qwen's, but extreme: top_k 1 alone would make every sample the argmax
    model.generation_config.update(top_k=1, top_p=0.01, repetition_penalty=10.0)
    try:
        torch.manual_seed(0)
        rollout = common.generate(model, tokenizer, ["1+2="], 64, 3, 1.0, eos)
    finally:
        model.generation_config.update(**shipped)
    # the tiny model is unsure at temperature 1: 64 samples from softmax(logits) are not all the same
    assert len({tuple(row) for row in rollout.completion_ids.tolist()}) > 1


def test_greedy_decoding_equals_transformers_generate(tiny):
    # the plain decoding loop of common.generate against the straightforward computation, transformers' own
    # greedy generate (left-padded batch, early stop, pads after EOS)
    from transformers import GenerationConfig

    model, tokenizer, eos = tiny
    prompts = ["1+2=", "13+45=", "7+8=", "99+1="]
    ours = common.generate(model, tokenizer, prompts, 1, 6, 1.0, eos, greedy=True).completion_ids
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    config = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    theirs = model.generate(**enc, generation_config=config)[:, enc.input_ids.shape[1] :]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    assert ours[:, theirs.shape[1] :].eq(tokenizer.pad_token_id).all()


def test_sampling_frequencies_follow_the_softmax(tiny):
    # 20000 first tokens after "1+2=" at temperature 0.7 against softmax(logits / 0.7) of a full forward.
    # Each frequency has standard deviation sqrt(p (1 - p) / n) <= 0.5 / sqrt(20000) = 0.0035; 0.02 is over 5
    # of them (seeded, so the test is deterministic)
    model, tokenizer, eos = tiny
    torch.manual_seed(0)
    n = 20000
    first = common.generate(model, tokenizer, ["1+2="], n, 1, 0.7, eos).completion_ids[:, 0]
    ids = tokenizer(["1+2="], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1] / 0.7, dim=-1)
    frequencies = torch.bincount(first, minlength=probs.numel()).float() / n
    assert (frequencies - probs).abs().max() < 0.02
    assert (probs > 0.05).sum() >= 2  # the test compares a spread distribution, not a near-certain token


def test_recorded_entropy_and_logprobs_are_the_sampling_distributions(tiny):
    # the on-policy update takes these as its values (completion_logprobs(values=...)): they must be a full
    # forward's, within float tolerance
    model, tokenizer, eos = tiny
    torch.manual_seed(1)
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 0.7, eos)
    logp, full = naive_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 0.7)
    expected = -(full.exp() * full).sum(-1) * rollout.completion_mask  # 0 past each completion's end
    torch.testing.assert_close(rollout.entropy, expected, rtol=1e-4, atol=1e-5)  # KV cache vs full forward
    torch.testing.assert_close(rollout.logprobs, logp * rollout.completion_mask, rtol=1e-4, atol=1e-5)
    assert rollout.completion_mask.sum() > rollout.completion_mask.shape[0]  # tokens past the first, not only EOS


@pytest.mark.skipif(not common.ONEDNN, reason="oneDNN is not available in this torch build")
def test_linear_through_onednn_equals_matmul():
    # common.linear's oneDNN path against torch's default matmul (MKL here), fp32, with the strided operands
    # the backward passes use (a transposed weight, a transposed input)
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(37, 64, generator=generator), torch.randn(300, 64, generator=generator)
    torch.testing.assert_close(common.linear(x, weight), x @ weight.t(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(37, 300, generator=generator)
    torch.testing.assert_close(common.linear(grad, weight.t()), grad @ weight, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(common.linear(grad.t(), x.t()), grad.t() @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(common.linear(x.t(), grad.t()).t(), grad.t() @ x, rtol=1e-5, atol=1e-4)
    # the bias inside the op, on a (batch, position, features) input as the no-grad forward passes hand it over
    bias = torch.randn(300, generator=generator)
    x3 = x.view(1, 37, 64)
    torch.testing.assert_close(common.linear(x3, weight, bias), x3 @ weight.t() + bias, rtol=1e-5, atol=1e-5)


def test_linear_layers_by_hand():
    # prepare_for_training routes nn.Linear through common._Linear (oneDNN on the CPU). x = [1, 2],
    # W = [[3, 4], [5, 6]], b = [1, 1]: y = [1*3 + 2*4 + 1, 1*5 + 2*6 + 1] = [12, 18]. With dL/dy = [1, 1]:
    # dx = [1, 1] @ W = [3 + 5, 4 + 6] = [8, 10]; dW = [1, 1]^T [1, 2] = [[1, 2], [1, 2]]; db = [1, 1]
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
        layer.bias.fill_(1.0)
    common.prepare_for_training(layer, gradient_checkpointing=False)
    x = torch.tensor([[[1.0, 2.0]]], requires_grad=True)  # (batch, position, features), as in a model
    y = layer(x)
    assert y.tolist() == [[[12.0, 18.0]]]
    y.sum().backward()
    assert x.grad.tolist() == [[[8.0, 10.0]]]
    assert layer.weight.grad.tolist() == [[1.0, 2.0], [1.0, 2.0]] and layer.bias.grad.tolist() == [1.0, 1.0]
    assert isinstance(layer.forward, functools.partial)  # routed through common._linear_forward


def test_wide_linear_layer_gradients_by_hand(monkeypatch):
    # 2 -> 3 features: more outputs than inputs, so _Linear.backward computes g.T @ x as (x.T @ g).T.
    # W = [[1, 0], [0, 1], [1, 1]], b = [0, 0, 1], rows x = [1, 2] and [3, 4]: y = x W^T + b = [1, 2, 4], [3, 4, 8].
    # Upstream dL/dy = g = [[1, 0, 1], [0, 1, 2]] (the loss is sum(y * g)):
    # dW = g^T x: row 0 = 1*[1, 2] + 0*[3, 4] = [1, 2]; row 1 = 0*[1, 2] + 1*[3, 4] = [3, 4];
    #      row 2 = 1*[1, 2] + 2*[3, 4] = [7, 10]
    # dx = g W: [1, 0, 1] -> [1, 0] + [1, 1] = [2, 1]; [0, 1, 2] -> [0, 1] + 2*[1, 1] = [2, 3]; db = [1, 1, 3]
    layer = torch.nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    common.prepare_for_training(layer, gradient_checkpointing=False)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    y = layer(x)
    assert y.tolist() == [[[1.0, 2.0, 4.0], [3.0, 4.0, 8.0]]]
    (y * torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])).sum().backward()
    assert layer.weight.grad.tolist() == [[1.0, 2.0], [3.0, 4.0], [7.0, 10.0]]
    assert x.grad.tolist() == [[[2.0, 1.0], [2.0, 3.0]]] and layer.bias.grad.tolist() == [1.0, 1.0, 3.0]
    # without autograd (generation, no-grad passes) the same values, without the autograd Function
    def no_function(*args):
        raise AssertionError("_Linear.apply called in a no-grad forward")

    monkeypatch.setattr(common._Linear, "apply", no_function)
    with torch.no_grad():
        assert layer(x).tolist() == [[[1.0, 2.0, 4.0], [3.0, 4.0, 8.0]]]


def test_tied_embedding_gradient_by_hand():
    # ids [[1, 0, 1, 2]] with padding id 0, the upstream gradient all ones: row 1 is looked up twice (gradient
    # [2, 2]), row 2 once ([1, 1]), the padding row 0 gets none. With no log-prob gradient handed over (the
    # `tie` dict stays empty) that is the whole weight gradient
    weight = torch.arange(6.0).view(3, 2).requires_grad_()
    out = common._TiedEmbedding.apply(torch.tensor([[1, 0, 1, 2]]), weight, 0, {})
    assert out.tolist() == [[[2.0, 3.0], [0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]]
    out.sum().backward()
    assert weight.grad.tolist() == [[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]]


class FakeLibc:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_keep_freed_cpu_memory_sets_glibcs_thresholds(monkeypatch):
    # glibc's malloc.h: M_MMAP_THRESHOLD is -3, M_TRIM_THRESHOLD is -1; 32 MiB = 32 * 2^20 = 33554432 bytes,
    # 1 GiB = 2^30 = 1073741824 bytes
    import ctypes

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    common.keep_freed_cpu_memory()
    assert libc.calls == [(-3, 33554432), (-1, 1073741824)]

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the user's own setting wins
    libc.calls.clear()
    common.keep_freed_cpu_memory()
    assert libc.calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc(answer=0))  # glibc refuses: say so
    with pytest.raises(RuntimeError, match="mallopt refused"):
        common.keep_freed_cpu_memory()

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)  # macOS, musl: the allocator is left as it is
    common.keep_freed_cpu_memory()


MAPPED_BYTES = """
import ctypes, sys, torch
sys.path.insert(0, {root!r})
import common
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Mallinfo2
if {keep}:
    common.get_device("cpu")
before = mallinfo2().hblkhd
block = torch.empty(8 << 20, dtype=torch.uint8)
print(mallinfo2().hblkhd - before)
"""


def glibc_with_mallinfo2() -> bool:
    name, version = platform.libc_ver()
    return sys.platform.startswith("linux") and name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 33)


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="needs glibc 2.33 or later (mallinfo2)")
@pytest.mark.parametrize("keep, mapped", [(False, True), (True, False)])
def test_on_the_cpu_blocks_come_from_the_heap(keep, mapped):
    # a fresh process allocates an 8 MiB tensor: by default glibc maps it from the OS (above its 128 KiB
    # threshold, hblkhd grows by at least 8 MiB); after get_device("cpu") it comes from the heap (hblkhd unchanged)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    code = MAPPED_BYTES.format(root=str(common.ROOT), keep=keep)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    grown = int(result.stdout.split()[-1])
    assert (grown >= 8 << 20) if mapped else grown == 0


def test_return_freed_cpu_memory_trims_glibcs_heap(monkeypatch):
    import ctypes

    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    common.return_freed_cpu_memory()
    assert libc.calls == [("malloc_trim", 0)]  # pad 0: every free page goes back

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    common.return_freed_cpu_memory()


RESIDENT_AFTER_FREE = """
import sys, torch
sys.path.insert(0, {root!r})
import common
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
common.get_device("cpu")
blocks = [torch.ones(1 << 18) for _ in range(64)]  # 64 blocks of 1 MiB, from the heap, touched
del blocks
kept = resident()
common.return_freed_cpu_memory()
print(kept - resident())
"""


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="needs glibc")
def test_freed_heap_is_kept_until_returned():
    # 64 MiB freed stays resident (get_device keeps up to 1 GiB of free heap) until return_freed_cpu_memory
    # hands it back: resident memory falls by at least 48 MiB of the 64 (the rest of the process may move)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    result = subprocess.run([sys.executable, "-c", RESIDENT_AFTER_FREE.format(root=str(common.ROOT))],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) >= 48 << 20


@pytest.mark.parametrize("columns, returned", [(1024, True), (1023, False)])
def test_tied_gradient_returns_freed_memory_first(monkeypatch, columns, returned):
    # the tied weight's gradient is mapped fresh when it is at least glibc's mmap threshold set here, 32 MiB:
    # 8192 x 1024 fp32 = 2^13 * 2^10 * 4 = 2^25 bytes = 32 MiB (returned first); 8192 x 1023 x 4 = 33521664 (not)
    calls = []
    monkeypatch.setattr(common, "return_freed_cpu_memory", lambda: calls.append(1))
    weight = torch.zeros(8192, columns, requires_grad=True)
    common._TiedEmbedding.apply(torch.tensor([[1, 2]]), weight, None, {}).sum().backward()
    assert len(calls) == (1 if returned else 0)
    assert weight.grad[1].sum().item() == columns  # the rows' own gradient still arrives: 1 per entry


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_one_chunk_of_logits_alive_at_a_time(monkeypatch, with_entropy, tied):
    # chunking exists so that the tokens x vocabulary logits never exist at once; a chunk still referenced (say,
    # by a loop variable) while the next one is computed doubles that (2 x 128 MB on Qwen2.5's vocabulary).
    # Forward, backward and the tied weight's pass: each chunk's logits are gone before the next is computed.
    original, alive = common._chunk_logits, []

    def chunk_logits(*args):
        assert all(ref() is None for ref in alive), "the previous chunk's logits are still referenced"
        z = original(*args)
        alive.append(weakref.ref(z))
        return z

    monkeypatch.setattr(common, "_chunk_logits", chunk_logits)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 3, generator=generator, requires_grad=True)
    ids, targets = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 6, 3, 3, 1])
    tie = {} if tied else None
    embedded = common._TiedEmbedding.apply(ids, weight, None, tie) if tied else weight[ids]
    hidden = torch.tanh(embedded)
    # 5 tokens in chunks of 2: 3 chunks forward, 3 backward, and 5 (chunks of max(1, 2 // 4) = 1) tied
    out = common._TokenLogprobs.apply(hidden, weight, None, targets, 1.0, 2, with_entropy, None, tie)
    (out[0] + out[1] if with_entropy else out).sum().backward()
    assert len(alive) == 3 + 3 + (5 if tied else 0)


def test_output_layers_that_change_the_logits_are_refused(tiny):
    # Gemma 2's softcap (and Cohere's logit scale, Granite's scaling) act after the output layer, which the
    # log-probs and the sampler here bypass: the model is refused rather than trained on other logits
    model, _, _ = tiny
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(common.UserError, match="final_logit_softcapping=30.0"):
            common.output_layer(model)
    finally:
        del model.config.final_logit_softcapping
    assert common.output_layer(model) is model.get_output_embeddings()


def test_models_train_without_dropout_and_checkpointing_is_active():
    # a tiny Qwen2 with 50% attention dropout: after common.prepare_for_training two forwards in training mode
    # agree (no dropout), and gradient checkpointing is on and gives the gradient of the plain backward
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(common.TINY_MODEL, attention_dropout=0.5)
    torch.manual_seed(0)
    plain = common.prepare_for_training(AutoModelForCausalLM.from_config(config), gradient_checkpointing=False)
    checkpointed = common.prepare_for_training(
        AutoModelForCausalLM.from_config(config).requires_grad_(True), gradient_checkpointing=True
    )
    checkpointed.load_state_dict(plain.state_dict())
    assert plain.training and checkpointed.training and common.is_checkpointing(checkpointed)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.testing.assert_close(plain(ids).logits, plain(ids).logits, rtol=0, atol=0)
    grads = []
    for model in (plain, checkpointed):
        model.zero_grad()
        model(ids).logits.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    # from_pretrained returns a model in eval mode, where transformers skips gradient checkpointing
    assert common.load_model("tiny", torch.device("cpu"), gradient_checkpointing=True).training
