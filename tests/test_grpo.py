"""GRPO math (grpo.py) against cases worked out by hand."""

import math

import pytest
import torch

import common
import dapo
import gfpo
import grpo
import gspo
import ppo
from test_scripts import check_bad_input


# dapo.py and gspo.py carry grpo.py's compute_advantages line for line: the same cases hold for all three
SAME_ADVANTAGES = pytest.mark.parametrize("script", [grpo, dapo, gspo], ids=["grpo", "dapo", "gspo"])


@SAME_ADVANTAGES
@pytest.mark.parametrize("eps", [1e-4, 1.0])
def test_advantages_one_group(script, eps):
    # rewards 1,0,0,0: mean 0.25, deviations 0.75,-0.25,-0.25,-0.25
    # sum of squares 0.5625 + 3*0.0625 = 0.75; unbiased var 0.75/3 = 0.25; std 0.5; + eps -> 0.5001 or 1.5
    # (eps 1 tells where eps goes: sqrt(0.25 + 1) = 1.118 would give 0.75/1.118 = 0.671, not 0.75/1.5 = 0.5)
    adv = script.compute_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, eps=eps)
    d = 0.5 + eps
    torch.testing.assert_close(adv, torch.tensor([0.75 / d, -0.25 / d, -0.25 / d, -0.25 / d]))


@pytest.mark.parametrize("script", ["grpo.py", "dapo.py", "gspo.py", "gfpo.py"])
def test_adv_eps_must_be_positive(script, tmp_path):
    # eps 0: a group whose rewards are all equal would give (r - mean) / (0 + 0) = 0 / 0 = NaN on every row, and the
    # NaN loss would skip the whole batch's update, not only that group's
    check_bad_input(script, ["--adv-eps", "0"], "--adv-eps 0.0: must be positive", tmp_path)


@SAME_ADVANTAGES
def test_advantages_all_equal_group_is_zero(script):
    # std 0: (1 - 1) / (0 + 1e-4) = 0 for every completion, whatever the shared value
    adv = script.compute_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=3, eps=1e-4)
    assert torch.equal(adv, torch.zeros(6))


@SAME_ADVANTAGES
def test_advantages_two_groups_different_spread(script):
    # group [0,1,2]: mean 1, deviations -1,0,1, var (1+0+1)/2 = 1, std 1 -> -1, 0, 1
    # group [0,0,3]: mean 1, deviations -1,-1,2, var (1+1+4)/2 = 3, std sqrt(3) -> -1/sqrt3, -1/sqrt3, 2/sqrt3
    adv = script.compute_advantages(torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0, 3.0]), group_size=3, eps=0.0)
    s3 = math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3]))


def loss_grad_metrics(loss_fn, logp, *args):
    """Run a script's compute_policy_loss(logp, *args); return the loss value, d loss / d logp and the metrics (None
    for a loss function that returns the loss only)."""
    logp = logp.clone().requires_grad_(True)
    out = loss_fn(logp, *args)
    loss, metrics = out if isinstance(out, tuple) else (out, None)
    loss.backward()
    return loss.item(), logp.grad, metrics


def loss_and_grad(logp, old_logp, ref_logp, adv, mask, clip_eps=0.2, beta=0.0):
    return loss_grad_metrics(grpo.compute_policy_loss, logp, old_logp, ref_logp, adv, mask, clip_eps, beta)


def test_policy_loss_ratio_one():
    # ratio 1 everywhere, beta 0: per-token loss is -A_i, so loss = -(1/B) sum_i A_i = -(1 - 0.5)/2 = -0.25
    # d loss / d logp[i,t] = -A_i * ratio / (B |o_i|): row 0 (2 tokens) -1/(2*2) = -0.25; row 1 (1 token) 0.5/2 = 0.25
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, grad, metrics = loss_and_grad(logp, logp.clone(), None, torch.tensor([1.0, -0.5]), mask)
    assert loss == pytest.approx(-0.25)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [0.25, 0.0]]))
    assert metrics["policy/clip_frac"].item() == 0.0
    assert metrics["policy/approx_kl"].item() == pytest.approx(0.0)


def test_policy_loss_clipping_above_and_below():
    # four one-token sequences, eps 0.2 (clip range 0.8..1.2):
    #   ratio 1.5, A=+1: min(1.5, 1.2) = 1.2 clipped      -> loss -1.2, gradient 0
    #   ratio 0.5, A=+1: min(0.5, 0.8) = 0.5 not clipped  -> loss -0.5, d/dlogp = -ratio*A = -0.5
    #   ratio 0.5, A=-1: min(-0.5, -0.8) = -0.8 clipped   -> loss  0.8, gradient 0
    #   ratio 1.5, A=-1: min(-1.5, -1.2) = -1.5 unclipped -> loss  1.5, d/dlogp = -ratio*A = 1.5
    # mean over B=4: (-1.2 - 0.5 + 0.8 + 1.5)/4 = 0.6/4 = 0.15; gradients / 4: 0, -0.125, 0, 0.375
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, grad, metrics = loss_and_grad(logp, old, None, adv, torch.ones(4, 1))
    assert loss == pytest.approx(0.15)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [-0.125], [0.0], [0.375]]))
    assert metrics["policy/clip_frac"].item() == pytest.approx(0.5)  # 2 of 4 tokens clipped


def test_policy_loss_k3_term():
    # one sequence of 2 tokens, A = 0 so only the KL term counts, beta 0.1:
    #   token 1: ref - logp = ln 2  -> k3 = 2 - ln2 - 1 = 0.306853
    #   token 2: ref - logp = -ln 2 -> k3 = 0.5 + ln2 - 1 = 0.193147
    # loss = 0.1 * (0.306853 + 0.193147) / 2 = 0.1 * 0.5 / 2 = 0.025
    # d k3 / d logp = 1 - exp(ref - logp): token 1: 1 - 2 = -1, token 2: 1 - 0.5 = 0.5; times 0.1/2 -> -0.05, 0.025
    logp = torch.tensor([[-1.0, -1.0]])
    ref = logp + torch.tensor([[math.log(2), -math.log(2)]])
    loss, grad, metrics = loss_and_grad(logp, logp.clone(), ref, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)
    assert loss == pytest.approx(0.025)
    torch.testing.assert_close(grad, torch.tensor([[-0.05, 0.025]]))
    assert metrics["loss/kl"].item() == pytest.approx(0.25)  # token mean of k3: 0.5 / 2


@pytest.mark.parametrize("loss_fn", [
    lambda logp, old, ref, adv, mask: grpo.compute_policy_loss(logp, old, ref, adv, mask, 0.2, 0.1),
    lambda logp, old, ref, adv, mask: gfpo.compute_policy_loss(logp, old, ref, adv, mask, 0.2, 0.1, 1),
], ids=["grpo", "gfpo"])
def test_policy_loss_k3_term_ignores_padding_past_eos(loss_fn):
    # one sequence, 1 valid token then one past EOS; A = 0, beta 0.1, so only the KL term counts:
    #   token 1: ref - logp = ln 2 -> k3 = 2 - ln2 - 1 = 0.306853; loss 0.1 * 0.306853 / 1 token = 0.0306853
    #   d k3 / d logp = 1 - 2 = -1, times 0.1 -> -0.1
    #   past EOS: ref_logp is padding (0) and logp = -100, where exp(0 - (-100)) = 2.7e43 overflows fp32 to inf
    #   and inf * mask 0 would give a NaN loss and gradient: it must count for 0 in both
    logp = torch.tensor([[-1.0, -100.0]])
    ref = torch.tensor([[-1.0 + math.log(2), 0.0]])
    loss, grad, _ = loss_grad_metrics(loss_fn, logp, logp.clone(), ref, torch.zeros(1), torch.tensor([[1.0, 0.0]]))
    assert loss == pytest.approx(0.0306853)
    torch.testing.assert_close(grad, torch.tensor([[-0.1, 0.0]]))


# each script's compute_policy_loss(logp, old_logp, advantages (B,), mask), no KL, its own clip range, the token
# count (num_tokens) of the mask
EVERY_POLICY_LOSS = pytest.mark.parametrize("loss_fn", [
    lambda logp, old, adv, mask: grpo.compute_policy_loss(logp, old, None, adv, mask, 0.2, 0.0),
    lambda logp, old, adv, mask: dapo.compute_policy_loss(logp, old, adv, mask, 0.2, 0.28, mask.sum()),
    lambda logp, old, adv, mask: gspo.compute_policy_loss(logp, old, adv, mask, 3e-4, 4e-4),
    lambda logp, old, adv, mask: gfpo.compute_policy_loss(logp, old, None, adv, mask, 0.2, 0.0, mask.sum()),
    lambda logp, old, adv, mask: ppo.compute_policy_loss(logp, old, adv[:, None] * mask, mask, 0.2, mask.sum()),
], ids=["grpo", "dapo", "gspo", "gfpo", "ppo"])


@EVERY_POLICY_LOSS
def test_clip_frac_counts_what_the_clip_cut_for_each_sign_of_the_advantage(loss_fn):
    # three one-token sequences (so GSPO's sequence ratio is the token's), every script's clip range inside
    # 0.8..1.28 of 1 (GSPO's 1 - 3e-4 .. 1 + 4e-4 too):
    #   ratio 0.5, A=-1: min(-0.5, -clip(0.5)) takes the clipped -0.8..: clipped, counted
    #   ratio 1.5, A=+1: min(1.5, clip(1.5)) takes the clipped 1.2..: clipped, counted
    #   ratio 1.0, A=+1: inside the range: not counted
    # clip_frac 2/3; counting ratio < 1 - eps with A > 0 or ratio > 1 + eps with A < 0 instead would give 1/3
    logp = torch.log(torch.tensor([[0.5], [1.5], [1.0]]))
    _, _, metrics = loss_grad_metrics(loss_fn, logp, torch.zeros(3, 1), torch.tensor([-1.0, 1.0, 1.0]),
                                      torch.ones(3, 1))
    assert metrics["policy/clip_frac"].item() == pytest.approx(2 / 3)


@EVERY_POLICY_LOSS
def test_policy_loss_ignores_ratio_past_eos(loss_fn):
    # one sequence, 1 valid token with ratio 1 and A = 1, then one past EOS (A = 0 there for ppo):
    #   valid token: -min(1 * 1, clip(1) * 1) = -1 over 1 token (1 sequence for gspo) -> loss -1
    #   d loss / d logp = -ratio * A = -1 on it; its k3 of (pi_old || pi), exp(0) - 0 - 1 = 0
    #   past EOS: old_logp -100 (a pad token the sampler never drew) and logp 0 after some updates, where
    #   exp(0 - (-100)) = 2.7e43 overflows fp32 to inf and inf * mask 0 would make the loss, gradient and
    #   approx_kl NaN: it must count for 0 in all three
    mask = torch.tensor([[1.0, 0.0]])
    loss, grad, metrics = loss_grad_metrics(loss_fn, torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.0, -100.0]]),
                                            torch.ones(1), mask)
    assert loss == pytest.approx(-1.0)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0]]))
    assert metrics["policy/approx_kl"].item() == 0.0


def test_policy_loss_seq_mean_token_mean_on_unequal_lengths():
    # A = 1 for both, no clipping (ratios within 0.8..1.2), per-token loss = -ratio:
    #   row 0, 3 tokens, ratios 1, 1.1, 0.9 -> mean -1.0
    #   row 1, 1 token, ratio 1.1 -> -1.1 (its masked positions hold ratio 5, which must be ignored)
    # seq-mean-token-mean = (-1.0 - 1.1)/2 = -1.05   (a token-mean would give (-3.0 - 1.1)/4 = -1.025)
    logp = torch.log(torch.tensor([[1.0, 1.1, 0.9], [1.1, 5.0, 5.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, grad, _ = loss_and_grad(logp, torch.zeros(2, 3), None, torch.tensor([1.0, 1.0]), mask)
    assert loss == pytest.approx(-1.05)
    assert grad[1, 1:].abs().sum().item() == 0.0


# Two rows, row 1's second token masked; ratios 1.5, 1 | 1, (1.5 masked); A = +1 | -1. Only token (0, 0) is on
# the clipped side (1.5 > 1.2 with A > 0); the masked 1.5 with A < 0 would be on the unclipped side anyway.
METRICS_LOGP = torch.log(torch.tensor([[1.5, 1.0], [1.0, 1.5]]))
METRICS_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
METRICS_ADV = torch.tensor([1.0, -1.0])


def assert_token_metrics(metrics):
    """The metrics of the case above, shared by the token-level scripts (grpo, dapo, gfpo, ppo)."""
    # clip_frac: 1 clipped of 3 valid tokens (over all 4 slots: 1/4; with the advantage signs swapped: 0)
    assert metrics["policy/clip_frac"].item() == pytest.approx(1 / 3)
    # approx_kl: k3 = r - 1 - ln r with r = pi / pi_old = 1.5 at token (0, 0), 1 elsewhere:
    #   1.5 - 1 - ln 1.5 = 0.5 - 0.405465 = 0.094535; over 3 tokens 0.031512
    #   (r = pi_old / pi would give 1/1.5 - 1 + ln 1.5 = 0.072132, over 3 tokens 0.024044)
    assert metrics["policy/approx_kl"].item() == pytest.approx(0.031512, abs=1e-6)


def test_policy_loss_metrics_count_valid_tokens_on_the_clipped_side():
    # per-token loss: row 0 -min(1.5, 1.2) = -1.2 and -1 (mean -1.1); row 1 -min(-1, -1) = 1; (-1.1 + 1)/2 = -0.05
    # the reference equals logp on the valid tokens (k3 = 0) and is off by ln 2 on the masked one: loss/kl 0
    # (a mean over all 4 slots would give (2 - ln 2 - 1)/4 = 0.0767)
    ref = METRICS_LOGP + torch.tensor([[0.0, 0.0], [0.0, math.log(2)]])
    loss, _, metrics = loss_and_grad(METRICS_LOGP, torch.zeros(2, 2), ref, METRICS_ADV, METRICS_MASK, beta=0.1)
    assert loss == pytest.approx(-0.05)
    assert_token_metrics(metrics)
    assert metrics["loss/kl"].item() == pytest.approx(0.0)


@pytest.fixture(scope="module")
def tiny_rollout(tiny):
    model, tokenizer, eos = tiny
    torch.manual_seed(0)
    return model, common.generate(model, tokenizer, ["1234+5=", "5678-3=", "4321+1="], 4, 8, 1.0, eos)


def off_policy_logprobs(model, rollout, noise):
    """The rollout's log-probs under `model`, shifted by `noise` x N(0, 1) so the ratio is off 1."""
    logp = common.rollout_logprobs(model, rollout, 1.0, micro_batch_size=len(rollout.lengths))
    return logp + noise * torch.randn_like(logp)


def assert_micro_batches_add_up(model, accumulate, minibatch_size, micro_batch_sizes):
    """`accumulate(micro_batch_size)` runs a script's accumulate_gradients over one minibatch and returns its
    metrics: the gradient and the minibatch's metrics (its loss, token means over all its tokens) must be the same
    whatever the micro-batch size. The rows must differ in length, or a plain mean of micro-batch means would pass."""

    def gradient(micro_batch_size):
        model.zero_grad()
        metrics = accumulate(micro_batch_size)
        return torch.cat([p.grad.flatten() for p in model.parameters()]), metrics

    whole, whole_metrics = gradient(minibatch_size)
    assert whole.abs().sum() > 0 and whole_metrics["policy/clip_frac"] > 0
    for micro_batch_size in micro_batch_sizes:
        grad, metrics = gradient(micro_batch_size)
        torch.testing.assert_close(grad, whole, rtol=1e-4, atol=1e-6)
        assert metrics.keys() == whole_metrics.keys()
        for name, value in metrics.items():
            torch.testing.assert_close(value, whole_metrics[name], rtol=1e-4, atol=1e-6, msg=name)


def assert_entropy_bonus_adds_its_gradient(model, rollout, accumulate, ent_coef=0.5):
    """`accumulate(ent_coef)` runs a script's accumulate_gradients with all rows of `rollout` as one minibatch.
    With ent_coef c the policy's gradient must be the ent_coef-0 gradient minus c times the gradient of the
    token-mean entropy at temperature 1, computed here directly from the full logits, without chunking."""

    def gradient(coef):
        model.zero_grad()
        accumulate(coef)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    without, with_bonus = gradient(0.0), gradient(ent_coef)
    model.zero_grad()
    position_ids = (rollout.attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=position_ids).logits
    log_probs = torch.log_softmax(logits[:, rollout.prompt_len - 1 : -1].float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    mask = rollout.completion_mask
    ((entropy * mask).sum() / mask.sum()).backward()
    entropy_gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert entropy_gradient.norm() > 0
    # float32 sums in another order (see test_rollout): compare whole vectors
    assert (with_bonus - (without - ent_coef * entropy_gradient)).norm() <= 1e-4 * entropy_gradient.norm()


def test_micro_batches_accumulate_the_whole_minibatch_gradient(tiny_rollout):
    model, rollout = tiny_rollout
    args = grpo.resolve_args(grpo.Args(beta=0.04))
    B = rollout.input_ids.shape[0]  # 3 prompts x 4 = 12 rows
    assert rollout.lengths.unique().numel() > 1  # unequal lengths: micro-batches hold unequal token counts
    # an off-policy old_logp and a reference different from the policy, so every term of the loss is live
    old_logp = off_policy_logprobs(model, rollout, 0.3)
    ref_logp = old_logp - 0.2
    advantages, minibatch = torch.randn(B), torch.randperm(B)
    assert_micro_batches_add_up(
        model,
        lambda m: grpo.accumulate_gradients(model, rollout, old_logp, ref_logp, advantages, minibatch, m, args),
        B, [3, 1],
    )


def assert_on_policy_shortcut_equals_the_old_logprob_pass(model, rollout, accumulate):
    """`accumulate(old_logp, ref_logp, advantages, minibatch)` runs a script's accumulate_gradients with all rows of
    `rollout` as one minibatch and returns its `loss/policy`. With one epoch and one minibatch main skips the no-grad
    old log-prob pass (old_logp None) and the update uses its own log-probs, detached: same loss and gradient as
    with the pass (ratio 1 either way). Without the detach the ratio, and so the advantages, give no gradient."""
    B = rollout.input_ids.shape[0]
    old_logp = common.rollout_logprobs(model, rollout, 1.0, micro_batch_size=5)  # 12 rows: 5, 5 and 2
    ref_logp, advantages, minibatch = old_logp - 0.2, torch.randn(B), torch.arange(B)

    def run(old):
        model.zero_grad()
        loss = accumulate(old, ref_logp, advantages, minibatch)
        return loss, torch.cat([p.grad.flatten() for p in model.parameters()])

    (loss_pass, grad_pass), (loss_shortcut, grad_shortcut) = run(old_logp), run(None)
    torch.testing.assert_close(loss_shortcut, loss_pass)
    # the pass's old log-probs come from other batch shapes, equal up to float32 rounding: compare whole vectors
    assert grad_pass.norm() > 0
    assert (grad_shortcut - grad_pass).norm() <= 1e-5 * grad_pass.norm()


def test_on_policy_shortcut_equals_the_old_logprob_pass(tiny_rollout):
    model, rollout = tiny_rollout
    args = grpo.resolve_args(grpo.Args(beta=0.04))

    def accumulate(old, ref, adv, rows):
        return grpo.accumulate_gradients(model, rollout, old, ref, adv, rows, len(rows), args)["loss/policy"]

    assert_on_policy_shortcut_equals_the_old_logprob_pass(model, rollout, accumulate)


def test_minibatch_metrics_weigh_micro_batches_by_their_tokens(tiny_rollout):
    # one row per micro-batch; A = +1 everywhere; old_logp = logp - ln 1.5 on the longest row r, logp elsewhere:
    #   row r: ratio 1.5 on each of its L_r tokens, clipped (1.5 > 1.2 with A > 0): per-token loss -1.2,
    #          k3 = 1.5 - 1 - ln 1.5 = 0.5 - 0.405465 = 0.094535 per token
    #   other rows: ratio 1, per-token loss -1, k3 0
    # over the minibatch's N tokens: clip_frac = L_r / N, approx_kl = 0.094535 L_r / N;
    # loss/policy, a mean over the B rows: (-1.2 - (B - 1)) / B = -1 - 0.2 / B
    # (a plain mean of the B micro-batches' own means would give clip_frac 1/B and approx_kl 0.094535/B)
    model, rollout = tiny_rollout
    args, B = grpo.resolve_args(grpo.Args(beta=0.0)), rollout.input_ids.shape[0]
    lengths = rollout.lengths.float()
    r, N = int(lengths.argmax()), lengths.sum().item()
    assert lengths[r].item() * B != N  # the token share differs from the row share
    old_logp = common.rollout_logprobs(model, rollout, 1.0, micro_batch_size=B)
    old_logp[r] -= math.log(1.5)
    metrics = grpo.accumulate_gradients(model, rollout, old_logp, None, torch.ones(B), torch.arange(B), 1, args)
    share = lengths[r].item() / N
    assert metrics["policy/clip_frac"].item() == pytest.approx(share, abs=1e-6)
    assert metrics["policy/approx_kl"].item() == pytest.approx(0.094535 * share, abs=1e-6)
    assert metrics["loss/policy"].item() == pytest.approx(-1 - 0.2 / B, abs=1e-5)


def test_accumulate_gradients_weighs_the_kl_by_beta(tiny_rollout):
    # advantages 0 and ref = the policy's log-probs - 0.2 on every token: each token's loss is beta * k3 with
    # x = ref - logp = -0.2: e^-0.2 + 0.2 - 1 = 0.818731 + 0.2 - 1 = 0.018731; any mean of it is 0.018731,
    # so loss/policy = 0.04 * 0.018731 = 7.4923e-4
    model, rollout = tiny_rollout
    args, B = grpo.resolve_args(grpo.Args(beta=0.04)), rollout.input_ids.shape[0]
    ref_logp = common.rollout_logprobs(model, rollout, 1.0, micro_batch_size=B) - 0.2
    metrics = grpo.accumulate_gradients(model, rollout, None, ref_logp, torch.zeros(B), torch.arange(B), B, args)
    assert metrics["loss/policy"].item() == pytest.approx(0.04 * (math.exp(-0.2) + 0.2 - 1), rel=1e-4)
