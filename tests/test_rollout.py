"""Rollout plumbing in common.py: completion masks, left padding, chunked log-probs."""

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
    # and the gradient through the checkpointed chunks equals the gradient of the naive computation
    model.zero_grad()
    (chunked_grad_logp := common.completion_logprobs(*args, chunk_size=7)[0]).sum().backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    naive_logprobs(*args)[0].sum().backward()
    for got, want in zip(chunked_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float sums in another order
    assert chunked_grad_logp.requires_grad


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
