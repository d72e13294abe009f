"""GSPO (gspo.py) against cases worked out by hand, and its own flags."""

import math

import pytest
import torch

import gspo
from test_grpo import loss_and_grad as grpo_loss_and_grad
from test_grpo import assert_micro_batches_add_up, assert_on_policy_shortcut_equals_the_old_logprob_pass
from test_grpo import loss_grad_metrics, off_policy_logprobs
from test_grpo import tiny_rollout  # noqa: F401  (fixture: 3 prompts x 4 completions of the tiny model)
from test_scripts import check_bad_input

PAPER_EPS = (3e-4, 4e-4)  # GSPO section 5.1: clip range 0.9997 .. 1.0004
WIDE_EPS = (0.5, 0.5)  # 0.5 .. 1.5: nothing below is clipped by it


def gspo_token_loss(logp, old_logp, advantages, mask, clip_eps_low, clip_eps_high):
    """GSPO-token (GSPO section 4.3): s_{i,t} = sg[s_i] * pi(o_{i,t}) / sg[pi(o_{i,t})], clipped per token,
    averaged per completion, then over completions. It differs from GSPO only for per-token advantages, so it is
    not in gspo.py: with one advantage per completion it must equal gspo.compute_policy_loss (tested below)."""
    lengths = mask.sum(dim=1).clamp(min=1)
    log_seq_ratio = ((logp - old_logp) * mask).sum(dim=1) / lengths
    # log s_{i,t} = sg[log s_i] + logp - sg[logp]: value s_i, gradient that of logp alone
    ratio = torch.exp(log_seq_ratio.detach()[:, None] + logp - logp.detach())
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * adv)
    return -((surrogate * mask).sum(dim=1) / lengths).mean()


def loss_and_grad(logp, old_logp, adv, mask, eps=PAPER_EPS, loss_fn=gspo.compute_policy_loss):
    return loss_grad_metrics(loss_fn, logp, old_logp, adv, mask, *eps)  # gspo_token_loss returns the loss only


# row 0: 3 valid tokens with log-ratios 0.3, -0.1, 0.1; row 1: 1 valid token with log-ratio -0.2, then two
# masked positions holding log-ratio 5 (a ratio of e^5 = 148 if they were counted) that must be ignored
LENGTH_LOGP = torch.tensor([[0.3, -0.1, 0.1], [-0.2, 5.0, 5.0]])
LENGTH_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_sequence_ratio_is_the_geometric_mean_over_valid_tokens():
    # s_0 = exp((0.3 - 0.1 + 0.1)/3) = e^0.1 = 1.105171; s_1 = e^-0.2 = 0.818731 (masked tokens ignored)
    # A = 1 for both, within 0.5 .. 1.5 so unclipped: loss = -(1.105171 + 0.818731)/2 = -0.961951
    # d loss / d logp[i,t] = -A_i s_i / (B |o_i|): row 0 -1.105171/(2*3) = -0.184195 on each of its 3 tokens
    # (GRPO would weigh each token by its own ratio), row 1 -0.818731/(2*1) = -0.409365, masked tokens 0
    loss, grad, _ = loss_and_grad(LENGTH_LOGP, torch.zeros(2, 3), torch.tensor([1.0, 1.0]), LENGTH_MASK, WIDE_EPS)
    assert loss == pytest.approx(-(math.exp(0.1) + math.exp(-0.2)) / 2)
    assert loss == pytest.approx(-0.961951, abs=1e-6)
    r0, r1 = -math.exp(0.1) / 6, -math.exp(-0.2) / 2
    torch.testing.assert_close(grad, torch.tensor([[r0, r0, r0], [r1, 0.0, 0.0]]))


# one 3-token sequence, paper eps; log-ratios average to +0.004 (s = e^0.004 = 1.004008 > 1.0004) or
# -0.004 (s = e^-0.004 = 0.996008 < 0.9997). Each row holds a token whose own ratio lies on the other side
# of 1 (-0.002 or +0.002): a token-level clip would treat it differently, GSPO clips the sequence whole.
UP = [0.01, -0.002, 0.004]  # (0.01 - 0.002 + 0.004)/3 = 0.012/3 = 0.004
DOWN = [-0.01, 0.002, -0.004]  # mean -0.004


@pytest.mark.parametrize(
    "log_ratios,adv,expected_loss,expected_grad,clipped",
    [
        # s above 1 + 4e-4 with A > 0: min(1.004008, 1.0004) = 1.0004 clipped -> loss -1.0004, no gradient
        (UP, 1.0, -1.0004, 0.0, 1.0),
        # s below 1 - 3e-4 with A < 0: min(-0.996008, -0.9997) = -0.9997 clipped -> loss 0.9997, no gradient
        (DOWN, -1.0, 0.9997, 0.0, 1.0),
        # s above with A < 0: min(-1.004008, -1.0004) = -1.004008 unclipped (the pessimistic side)
        #   loss 1.004008; d/dlogp_t = -A s / |o| = 1.004008/3 = 0.334669 on every token
        (UP, -1.0, 1.004008, 0.334669, 0.0),
        # s below with A > 0: min(0.996008, 0.9997) = 0.996008 unclipped -> loss -0.996008, grad -0.996008/3
        (DOWN, 1.0, -0.996008, -0.332003, 0.0),
        # s = e^0.00035 = 1.000350 with A > 0: above 1 + 3e-4 but below 1 + 4e-4, so unclipped (the upper bound is
        # eps_high's) -> loss -1.000350, grad -1.000350/3 = -0.333450
        ([3.5e-4] * 3, 1.0, -1.000350, -0.333450, 0.0),
    ],
)
def test_sequence_clipping_is_all_or_nothing(log_ratios, adv, expected_loss, expected_grad, clipped):
    logp = torch.tensor([log_ratios])
    loss, grad, metrics = loss_and_grad(logp, torch.zeros(1, 3), torch.tensor([adv]), torch.ones(1, 3))
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    torch.testing.assert_close(grad, torch.full((1, 3), expected_grad), atol=1e-6, rtol=0)
    assert metrics["policy/clip_frac"].item() == clipped


def test_on_policy_gradient_equals_grpo_without_kl():
    # logp = old_logp: s_i = 1 whatever the token values, no clipping; loss = -(1/B) sum_i A_i = -(1 - 0.5)/2 = -0.25
    # d s_i / d logp[i,t] = s_i / |o_i| = 1/|o_i|, so d loss / d logp[i,t] = -A_i / (B |o_i|):
    #   row 0 (2 tokens) -1/(2*2) = -0.25 each; row 1 (1 token) 0.5/(2*1) = 0.25; its masked token 0
    # GRPO with beta 0: per-token -ratio_t A_i with ratio 1, seq-mean-token-mean -> the same loss and gradient
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -0.5])
    loss, grad, metrics = loss_and_grad(logp, logp.clone(), adv, mask)
    assert loss == pytest.approx(-0.25)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [0.25, 0.0]]))
    assert metrics["policy/clip_frac"].item() == 0.0
    grpo_loss, grpo_grad, _ = grpo_loss_and_grad(logp, logp.clone(), None, adv, mask, clip_eps=0.2, beta=0.0)
    assert grpo_loss == pytest.approx(loss)
    torch.testing.assert_close(grpo_grad, grad)


def test_clip_frac_counts_sequences_and_token_deviations_can_cancel():
    # row 0: 3 tokens, mean log-ratio 0.004 with A = +1 -> clipped (s = 1.004008 > 1.0004)
    # row 1: 2 tokens with ratios 2 and 0.5 (log-ratios ln2, -ln2), A = +1: s = exp(0) = 1, not clipped,
    #   though GRPO's token clip would clip its ratio-2 token
    # row 2: 1 token, log-ratio 0, A = -1: s = 1, not clipped
    # clip_frac = 1 clipped sequence of 3 = 1/3 (a token-weighted fraction would give 3 of 6 tokens = 1/2)
    # gradient: row 0 none; row 1 -A s / (B |o|) = -1/(3*2) = -1/6 on both tokens; row 2 1/(3*1) = 1/3
    ln2 = math.log(2)
    logp = torch.tensor([UP, [ln2, -ln2, 9.0], [0.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    _, grad, metrics = loss_and_grad(logp, torch.zeros(3, 3), torch.tensor([1.0, 1.0, -1.0]), mask)
    assert metrics["policy/clip_frac"].item() == pytest.approx(1 / 3)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [-1 / 6, -1 / 6, 0.0], [1 / 3, 0.0, 0.0]]))


def test_approx_kl_stays_token_level_k3():
    # one sequence, log-ratios ln r = logp - old = ln4, -ln2, -ln2 (sum 0, s = 1): k3 = r - 1 - ln r per token:
    #   r = 4: 4 - 1 - 1.386294 = 1.613706; r = 1/2: 0.5 - 1 + 0.693147 = 0.193147 (twice)
    # token mean (3 - 2 ln2 + 2 (ln2 - 0.5))/3 = 2/3 = 0.666667; the sequence-level log-ratio is 0 and would give
    # 0; r = pi_old / pi would give (0.25 + ln4 - 1 + 2 (2 - ln2 - 1))/3 = 1.25/3
    ln2 = math.log(2)
    logp, mask = torch.tensor([[2 * ln2, -ln2, -ln2]]), torch.ones(1, 3)
    _, _, metrics = loss_and_grad(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask)
    assert metrics["policy/approx_kl"].item() == pytest.approx(2 / 3)


# (logp, old_logp, advantages, mask, eps) with a single advantage per sequence
TOKEN_CASES = {
    "unclipped, unequal lengths": (LENGTH_LOGP, torch.zeros(2, 3), torch.tensor([1.0, -2.0]), LENGTH_MASK, WIDE_EPS),
    "clipped and unclipped rows": (
        torch.tensor([UP, DOWN, UP, DOWN]), torch.zeros(4, 3), torch.tensor([1.0, -1.0, -0.5, 2.0]), torch.ones(4, 3),
        PAPER_EPS,
    ),
}


@pytest.mark.parametrize("case", TOKEN_CASES.values(), ids=TOKEN_CASES.keys())
def test_gspo_token_equals_gspo_in_value_and_gradient(case):
    # GSPO-token: s_{i,t} = sg[s_i] pi_t / sg[pi_t] has the value s_i and d s_{i,t} / d logp[i,t] = s_i, so the
    # seq-mean-token-mean of min(s_{i,t} A_i, clip(s_{i,t}) A_i) is (1/B) sum_i min(s_i A_i, clip(s_i) A_i),
    # and its gradient -A_i s_i / (B |o_i|) per valid token (0 when clipped) is GSPO's. First case by hand:
    #   loss = -(1 * e^0.1 - 2 * e^-0.2)/2 = -(1.105171 - 1.637462)/2 = 0.532291/2 = 0.266145
    logp, old_logp, adv, mask, eps = case
    loss, grad, _ = loss_and_grad(logp, old_logp, adv, mask, eps)
    token_loss, token_grad, _ = loss_and_grad(logp, old_logp, adv, mask, eps, gspo_token_loss)
    assert token_loss == pytest.approx(loss, abs=1e-7)
    torch.testing.assert_close(token_grad, grad)
    if eps == WIDE_EPS:
        assert loss == pytest.approx(0.266145, abs=1e-6)
    else:
        assert grad[0].abs().sum() == 0 and grad[1].abs().sum() == 0  # rows 0 and 1 clipped
        assert grad[2].abs().sum() > 0 and grad[3].abs().sum() > 0


def test_micro_batches_accumulate_the_whole_minibatch_gradient(tiny_rollout):  # noqa: F811
    model, rollout = tiny_rollout
    args = gspo.resolve_args(gspo.Args())
    B = rollout.input_ids.shape[0]  # 3 prompts x 4 = 12 rows
    # off-policy by a small per-token shift, so some sequences are clipped (paper eps) and others are not
    old_logp = off_policy_logprobs(model, rollout, 1e-3)
    advantages, minibatch = torch.randn(B), torch.randperm(B)
    assert_micro_batches_add_up(
        model, lambda m: gspo.accumulate_gradients(model, rollout, old_logp, advantages, minibatch, m, args), B, [3, 1]
    )


def test_on_policy_shortcut_equals_the_old_logprob_pass(tiny_rollout):  # noqa: F811
    model, rollout = tiny_rollout
    args = gspo.resolve_args(gspo.Args(num_minibatches=1))

    def accumulate(old, ref, adv, rows):
        return gspo.accumulate_gradients(model, rollout, old, adv, rows, len(rows), args)["loss/policy"]

    assert_on_policy_shortcut_equals_the_old_logprob_pass(model, rollout, accumulate)


@pytest.mark.parametrize(
    "args,names",
    [
        (["--clip-eps-low", "-0.1"], "--clip-eps-low"),
        (["--clip-eps-high", "-0.1"], "--clip-eps-high"),  # below the default --clip-eps-low 3e-4
        (["--clip-eps-low", "0.01", "--clip-eps-high", "0.001"], "--clip-eps-high"),
        (["--group-size", "1"], "--group-size"),
        # the default 4 minibatches need a rollout batch divisible by 4: 1 prompt x 2 completions is not
        (["--num-prompts", "1", "--group-size", "2"], "--num-minibatches"),
    ],
)
def test_bad_gspo_input(args, names, tmp_path):
    check_bad_input("gspo.py", args, names, tmp_path)
