"""Rollout plumbing in common.py: completion masks, left padding, chunked log-probs."""

import math
from types import SimpleNamespace

import pytest
import torch

import common


@pytest.mark.parametrize("generation_eos,tokenizer_eos,expected", [
    ([2, 7], 7, [2, 7]),  # a chat model's generation config lists the tokenizer's EOS and its end-of-turn token
    ([2], 7, [2, 7]),  # the tokenizer's EOS added
    (2, 7, [2, 7]),  # a single id, not a list
    (None, 7, [7]),
    ([2], None, [2]),
])
def test_eos_token_ids_joins_the_generation_config_and_the_tokenizer(generation_eos, tokenizer_eos, expected):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=generation_eos))
    assert common.eos_token_ids(model, SimpleNamespace(eos_token_id=tokenizer_eos)) == expected


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
    torch.manual_seed(0)
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 1.0, eos)
    assert rollout.prompt_len == 6
    # as wide as the longest completion (EOS included), not max_new_tokens
    assert rollout.completion_ids.shape == (6, rollout.lengths.max()) and rollout.lengths.max() <= 5
    assert rollout.attention_mask[:3, :6].tolist() == [[0, 0, 1, 1, 1, 1]] * 3
    assert rollout.attention_mask[3:, :6].tolist() == [[1] * 6] * 3
    assert rollout.attention_mask[:, 6:].eq(1).all()
    # rows 0-2 answer prompt 0, rows 3-5 prompt 1
    assert tokenizer.decode(rollout.input_ids[2, 2:6]) == "1+2="
    assert tokenizer.decode(rollout.input_ids[4, :6]) == "13+45="


def test_rows_that_end_early_are_padded_and_the_others_run_on(tiny):
    # greedy, the embedded model answers 3299+5= directly ("3303", 4 + EOS = 5 tokens) and counts for 4588+3=
    # ("count 4589+2=4590+1=4591", 24 + EOS = 25): the batch runs until the longer one ends, the shorter one is
    # padded after its EOS, and neither is truncated
    model, tokenizer, eos = tiny
    rollout = common.generate(model, tokenizer, ["3299+5=", "4588+3="], 1, 40, 1.0, eos, greedy=True)
    assert common.decode_completions(tokenizer, rollout) == ["3303", "count 4589+2=4590+1=4591"]
    assert rollout.lengths.tolist() == [5, 25] and rollout.completion_ids.shape[1] == 25
    assert rollout.truncated.tolist() == [False, False]
    assert rollout.completion_ids[0, 5:].eq(tokenizer.pad_token_id).all()
    assert rollout.completion_mask.sum(dim=1).tolist() == [5, 25]


def positions_seen(model, fn):
    """fn's result, and the position ids of every forward of the backbone while it ran."""
    seen = []
    hook = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].tolist()), with_kwargs=True)
    try:
        return fn(), seen
    finally:
        hook.remove()


def test_positions_skip_the_left_padding(tiny):
    # the position ids the backbone sees (RoPE would not notice a shift; an absolute-position model would):
    # "1+2=" (2 pads on the left) and "13+45=": prefill [0 0 0 1 2 3] and [0 1 2 3 4 5]; the first decoding step
    # of groups of 2 at 4, 4 | 6, 6; the training forward the prompt's, then 4, 5, .. | 6, 7, .. per completion token
    model, tokenizer, eos = tiny
    torch.manual_seed(0)
    rollout, in_generate = positions_seen(model, lambda: common.generate(model, tokenizer, ["1+2=", "13+45="], 2, 3,
                                                                         1.0, eos))
    with torch.no_grad():
        _, seen = positions_seen(model, lambda: common.completion_logprobs(model, rollout, 1.0))
    assert in_generate[0] == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert len(in_generate) > 1 and in_generate[1] == [[4], [4], [6], [6]]
    T = rollout.completion_ids.shape[1]  # the training forward reads all but the last completion token
    assert seen == [[[0, 0, 0, 1, 2, 3, *range(4, 3 + T)]] * 2 + [[*range(5 + T)]] * 2]


def test_a_rollout_that_reaches_the_budget_runs_one_forward_per_token(tiny):
    # greedy, with an EOS the model never writes (<unk>): every row runs to max_new_tokens = 3, and 3 tokens take
    # 3 forwards: the prefill gives token 1, decoding steps at positions 4, 4 | 6, 6 and 5, 5 | 7, 7 tokens 2 and 3;
    # a forward after token 3 (at 6, 6 | 8, 8) would compute logits nothing reads
    model, tokenizer, _ = tiny
    rollout, seen = positions_seen(model, lambda: common.generate(model, tokenizer, ["1+2=", "13+45="], 2, 3, 1.0,
                                                                  [tokenizer.unk_token_id], True))
    assert rollout.completion_ids.shape[1] == 3 and bool(rollout.truncated.all())
    assert seen[1:] == [[[4], [4], [6], [6]], [[5], [5], [7], [7]]]


def naive_logprobs(model, rollout, temperature):
    """The straightforward computation: the model's full (B, P + T, vocab) logits, log-softmax, gather."""
    position_ids = (rollout.attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, rollout.prompt_len - 1 : -1].float() / temperature, dim=-1)
    return logp.gather(-1, rollout.completion_ids[:, :, None]).squeeze(-1), logp


def gradients(model):
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def test_chunked_logprobs_equal_full_log_softmax(tiny):
    # values and gradients of completion_logprobs (chunks under activation checkpointing) against the naive
    # computation, for the log-probs and the entropy (the entropy bonus trains through it)
    model, tokenizer, eos = tiny
    torch.manual_seed(0)
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 0.7, eos)
    model.zero_grad()
    expected, full = naive_logprobs(model, rollout, 0.7)
    expected_entropy = -(full.exp() * full).sum(-1)
    (expected.sum() + expected_entropy.sum()).backward()
    naive_grads = gradients(model)
    # chunks of 7 tokens do not divide the 6 x T completion tokens: the last chunk is short
    logp, entropy = common.completion_logprobs(model, rollout, 0.7, with_entropy=True, chunk_size=7)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    (logp.sum() + entropy.sum()).backward()
    for got, want in zip(gradients(model), naive_grads):  # float32 sums in another order: whole tensors
        assert (got - want).norm() <= 1e-4 * want.norm()
    with torch.no_grad():  # the no-grad path (old and reference log-probs) gives the same values
        torch.testing.assert_close(common.completion_logprobs(model, rollout, 0.7, chunk_size=7)[0], logp.detach())
    # and so does rollout_logprobs, at the sampling temperature, 4 rows per forward (zero past each completion)
    mask = rollout.completion_mask
    torch.testing.assert_close(common.rollout_logprobs(model, rollout, 0.7, 4) * mask, logp.detach() * mask)


def test_an_lm_head_bias_is_divided_by_the_temperature_too():
    # hidden 1, weight 0, bias [0, 2 ln 3], temperature 2: logits / T = [0, ln 3], softmax [1/4, 3/4];
    # log-prob of token 1 = ln 0.75 = -0.287682 (an undivided bias would give [0, 2 ln 3]: ln(9/10) = -0.105361)
    logp, _ = common._token_logprobs(torch.ones(1, 1), torch.tensor([1]), torch.zeros(2, 1),
                                     torch.tensor([0.0, 2 * math.log(3)]), 2.0, False)
    assert logp.item() == pytest.approx(math.log(0.75))


def test_no_tensor_holds_every_tokens_logits(tiny):
    # 6 rows x up to 5 tokens x 98 vocabulary entries: with chunks of 4 tokens no fp32 tensor of logits' shape
    # (tokens x 98) in the forward or the backward (activation checkpointing recomputes each chunk) holds more than
    # 4 tokens' rows. The only other fp32 tensors with 98 columns are the LM head weight's transpose, 128 x 98
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape[-1:] == (98,):
                    if t.shape != (128, 98):
                        LargestFloat32.largest = max(LargestFloat32.largest, t.numel() // 98)
            return out

    model, tokenizer, eos = tiny
    torch.manual_seed(0)
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 1.0, eos)
    B, T = rollout.completion_ids.shape
    assert B * T > 8
    with LargestFloat32():
        logp, entropy = common.completion_logprobs(model, rollout, 1.0, with_entropy=True, chunk_size=4)
        (logp.sum() + entropy.sum()).backward()
    model.zero_grad()
    assert LargestFloat32.largest == 4


def test_the_chunks_weight_gradients_are_summed_in_place(tiny):
    # the tied embedding (98 x 128) gets one gradient per LM head chunk plus one from the input embedding. Autograd
    # sums them into one buffer: in place (add_) they hold two vocab x hidden tensors at once; an out-of-place add
    # (a new sum while both terms live) would hold three. 6 rows x 5 tokens = 30 tokens in chunks of 8: 4 chunks,
    # so 4 + 1 = 5 gradients and 4 in-place adds. (The profiler sees the ops without holding references to them.)
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer, eos = tiny
    assert common.output_layer(model).weight is model.get_input_embeddings().weight
    torch.manual_seed(0)
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 1.0, eos)
    assert rollout.completion_ids.shape == (6, 5)
    logp, _ = common.completion_logprobs(model, rollout, 1.0, chunk_size=8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        logp.sum().backward()
    model.zero_grad()
    adds = [e.name for e in prof.events() if e.name in ("aten::add", "aten::add_") and e.input_shapes[:1] == [[98, 128]]]
    assert adds == ["aten::add_"] * 4


def test_token_logprobs_entropy_and_gradients_by_hand():
    # a 2-token vocabulary; hidden [1] through weights [0, 2 ln 3] gives logits [0, 2 ln 3], at temperature 2
    # z = [0, ln 3]: p = [1/4, 3/4]. Entropy H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.3466 + 0.2158 = 0.5623.
    # log p(token 1) = ln 3/4 = -0.2877
    hidden = torch.ones(1, 1, requires_grad=True)
    weight = torch.tensor([[0.0], [2 * math.log(3)]], requires_grad=True)
    logp, entropy = common._token_logprobs(hidden, torch.tensor([1]), weight, None, 2.0, True)
    assert logp.item() == pytest.approx(-0.2877, abs=1e-4)
    assert entropy.item() == pytest.approx(0.5623, abs=1e-4)
    # d logp / dz = e_1 - p = [-1/4, 1/4]; d / dlogits = that / T = [-1/8, 1/8]
    # d weight = dlogits^T hidden = [[-1/8], [1/8]]; d hidden = dlogits . weight = 1/8 * 2 ln 3 = 0.2747
    logp.sum().backward(retain_graph=True)
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.125], [0.125]]))
    assert hidden.grad.item() == pytest.approx(math.log(3) / 4, abs=1e-6)
    # d H / dz_j = -p_j (log p_j + H): -(1/4)(-1.3863 + 0.5623) = 0.2060 and -(3/4)(-0.2877 + 0.5623) = -0.2060;
    # / T = [0.1030, -0.1030]; d hidden = -0.1030 * 2 ln 3 = -0.2263
    hidden.grad, weight.grad = None, None
    entropy.sum().backward()
    torch.testing.assert_close(weight.grad, torch.tensor([[0.1030], [-0.1030]]), atol=1e-4, rtol=0)
    assert hidden.grad.item() == pytest.approx(-0.2263, abs=1e-4)


def test_left_padding_does_not_change_logprobs(tiny):
    model, tokenizer, eos = tiny
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 1, 4, 1.0, eos)
    batched, _ = common.completion_logprobs(model, rollout, 1.0)
    # the padded row 0 alone (select drops its 2 pad columns) must score its completion the same
    alone = rollout.select(torch.tensor([0]))
    assert alone.prompt_len == 4
    single, _ = common.completion_logprobs(model, alone, 1.0)
    torch.testing.assert_close(batched[:1, : single.shape[1]], single, rtol=1e-5, atol=1e-5)


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
    theirs = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, generation_config=config)
    theirs = theirs[:, enc.input_ids.shape[1] :]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    assert ours[:, theirs.shape[1] :].eq(tokenizer.pad_token_id).all()


def test_sampling_frequencies_follow_the_softmax(tiny):
    # 20000 first tokens after "1234+5=" (the direct answer's "1" or the working's "c") at temperature 0.7
    # against softmax(logits / 0.7) of a full forward.
    # Each frequency has standard deviation sqrt(p (1 - p) / n) <= 0.5 / sqrt(20000) = 0.0035; 0.02 is over 5
    # of them (seeded, so the test is deterministic)
    model, tokenizer, eos = tiny
    torch.manual_seed(0)
    n = 20000
    first = common.generate(model, tokenizer, ["1234+5="], n, 1, 0.7, eos).completion_ids[:, 0]
    ids = tokenizer(["1234+5="], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1] / 0.7, dim=-1)
    frequencies = torch.bincount(first, minlength=probs.numel()).float() / n
    assert (frequencies - probs).abs().max() < 0.02
    assert (probs > 0.05).sum() >= 2  # the test compares a spread distribution, not a near-certain token


def test_recorded_entropy_is_the_sampling_distributions(tiny):
    # policy/entropy is the entropy recorded while sampling: it must be a full forward's, within float tolerance
    model, tokenizer, eos = tiny
    torch.manual_seed(1)
    rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 3, 5, 0.7, eos)
    _, full = naive_logprobs(model, rollout, 0.7)
    expected = -(full.exp() * full).sum(-1) * rollout.completion_mask  # 0 past each completion's end
    torch.testing.assert_close(rollout.entropy, expected.detach(), rtol=1e-4, atol=1e-5)  # KV cache vs full forward
    assert rollout.completion_mask.sum() > rollout.completion_mask.shape[0]  # tokens past the first, not only EOS


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
    # the tiny model with 50% attention dropout: after common.prepare two forwards in training mode agree (no
    # dropout), and gradient checkpointing is on and gives the gradient of the plain backward
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(common.TINY_MODEL, attention_dropout=0.5)
    torch.manual_seed(0)
    plain = common.prepare(AutoModelForCausalLM.from_config(config), gradient_checkpointing=False)
    checkpointed = common.prepare(AutoModelForCausalLM.from_config(config), gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    # transformers 5 renamed is_gradient_checkpointing (kept, deprecated) to is_activation_checkpointing
    is_checkpointing = getattr(checkpointed, "is_activation_checkpointing", None)
    if is_checkpointing is None:
        is_checkpointing = checkpointed.is_gradient_checkpointing
    assert plain.training and checkpointed.training and is_checkpointing
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


def test_models_load_with_pytorch_layers_not_hub_kernels():
    # transformers 5.25 kernelizes from the Hub by default; older versions (CI's) need the flag passed to see it
    class Recorder:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            raise OSError(f"use_kernels={kwargs.get('use_kernels', 'unset')}")

    with pytest.raises(common.UserError, match=r"\(use_kernels=False\)"):
        common._from_pretrained(Recorder, "tiny", "sdpa")


def hand_rollout(prompt_ids, prompt_mask, completion_ids, lengths, truncated):
    completion_ids = torch.tensor(completion_ids)
    mask = (torch.arange(completion_ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).float()
    entropy = completion_ids.float() / 10 * mask  # any per-token values, to see them follow their rows
    return common.Rollout(torch.tensor(prompt_ids), torch.tensor(prompt_mask), completion_ids, mask,
                          torch.tensor(lengths), torch.tensor(truncated), entropy)


def test_rollout_cat_pads_to_the_widest_and_select_cuts_to_the_rows():
    # round 1: prompts 2 wide, completions 2 wide; round 2: prompts 3 wide (its first row left-padded with 0),
    # completions 3 wide. Pad id 99: prompts get it on the left (mask 0), completions on the right (mask 0)
    first = hand_rollout([[5, 6], [5, 4]], [[1, 1], [1, 1]], [[7, 8], [9, 9]], [2, 1], [True, False])
    second = hand_rollout([[0, 4, 5], [3, 4, 5]], [[0, 1, 1], [1, 1, 1]], [[6, 7, 1], [8, 1, 1]], [3, 1],
                          [True, False])
    both = common.Rollout.cat([first, second], pad_id=99)
    assert both.prompt_len == 3
    assert both.prompt_ids.tolist() == [[99, 5, 6], [99, 5, 4], [0, 4, 5], [3, 4, 5]]
    assert both.prompt_mask.tolist() == [[0, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert both.completion_ids.tolist() == [[7, 8, 99], [9, 9, 99], [6, 7, 1], [8, 1, 1]]
    assert both.completion_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert both.lengths.tolist() == [2, 1, 3, 1] and both.truncated.tolist() == [True, False, True, False]
    assert both.input_ids[0].tolist() == [99, 5, 6, 7, 8, 99]
    assert both.attention_mask[0].tolist() == [0, 1, 1, 1, 1, 1]
    # rows 3 and 1: no prompt column is padding in both (row 3 uses them all), the longest completion is 1 token
    picked = both.select(torch.tensor([3, 1]))
    assert picked.prompt_ids.tolist() == [[3, 4, 5], [99, 5, 4]] and picked.prompt_len == 3
    assert picked.completion_ids.tolist() == [[8], [9]] and picked.lengths.tolist() == [1, 1]
    torch.testing.assert_close(picked.entropy, torch.tensor([[0.8], [0.9]]))
    # rows 0 and 1: the first prompt column is padding in both and goes; completions 2 wide
    picked = both.select(torch.tensor([0, 1]))
    assert picked.prompt_ids.tolist() == [[5, 6], [5, 4]] and picked.prompt_mask.tolist() == [[1, 1], [1, 1]]
    assert picked.completion_ids.tolist() == [[7, 8], [9, 9]]


def test_rollout_cat_and_select_leave_the_logprobs_unchanged(tiny):
    # "1+2=" is 4 tokens and "13+45=" 6: the first rollout gets 2 more pad tokens in the concatenation, and
    # completions of other widths are right-padded: the attention mask and position ids must make both invisible
    model, tokenizer, eos = tiny
    torch.manual_seed(0)
    rollouts = [common.generate(model, tokenizer, [p], 2, 3, 1.0, eos) for p in ("1+2=", "13+45=")]
    both = common.Rollout.cat(rollouts, tokenizer.pad_token_id)
    assert [r.prompt_len for r in rollouts] == [4, 6] and both.prompt_len == 6
    with torch.no_grad():
        parts = [common.completion_logprobs(model, r, 1.0)[0] * r.completion_mask for r in rollouts]
        T = both.completion_ids.shape[1]
        expected = torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in parts])
        torch.testing.assert_close(common.completion_logprobs(model, both, 1.0)[0] * both.completion_mask, expected,
                                   rtol=1e-5, atol=1e-5)
