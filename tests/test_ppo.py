"""PPO math (ppo.py) against cases worked out by hand, and the critic's plumbing."""

import math
import re

import pytest
import torch

import common
import gfpo
import ppo
import test_grpo
from test_grpo import METRICS_ADV, METRICS_LOGP, METRICS_MASK, assert_token_metrics
from test_grpo import assert_entropy_bonus_adds_its_gradient, assert_micro_batches_add_up, off_policy_logprobs
from test_grpo import tiny_rollout  # noqa: F401  (a pytest fixture: 3 prompts x 4 completions of the tiny model)

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# Per-token rewards
# ---------------------------------------------------------------------------------------------------------

# Two completions of 3 token slots:
#   row 0 ends with EOS at t=1 (mask 1 1 0), score 1.0:  old - ref = 0.5, -1.0 (t=2 is masked)
#   row 1 is truncated (mask 1 1 1), score 0.5:           old - ref = 0.0, 0.2, -0.3
OLD_LOGP = torch.tensor([[-1.0, -2.0, -5.0], [-0.2, -0.3, -0.4]])
REF_LOGP = torch.tensor([[-1.5, -1.0, -0.1], [-0.2, -0.5, -0.1]])
REWARD_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
SCORE = torch.tensor([1.0, 0.5])


@pytest.mark.parametrize(
    "ref_logp,beta,expected",
    [
        # beta 0.1: -0.1 * (old - ref) on every valid token, the score added on the last valid one
        #   row 0: -0.05, 0.1 + 1.0 = 1.1, 0 (masked)      row 1: 0, -0.02, 0.03 + 0.5 = 0.53
        (REF_LOGP, 0.1, [[-0.05, 1.1, 0.0], [0.0, -0.02, 0.53]]),
        # no reference (beta 0 loads none): the score alone, on the EOS (t=1) and on the truncated row's t=2
        (None, 0.0, [[0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]),
    ],
)
def test_rewards_kl_on_every_token_and_the_score_on_the_last(ref_logp, beta, expected):
    rewards = ppo.compute_rewards(SCORE, OLD_LOGP, ref_logp, REWARD_MASK, beta)
    torch.testing.assert_close(rewards, torch.tensor(expected))


# ---------------------------------------------------------------------------------------------------------
# GAE and whitening
# ---------------------------------------------------------------------------------------------------------

# One completion of 3 tokens: rewards r = 0.1, -0.2, 1.0 and values V = 0.5, 0.4, 0.3; V after t=2 is 0.
GAE_REWARDS = torch.tensor([[0.1, -0.2, 1.0]])
GAE_VALUES = torch.tensor([[0.5, 0.4, 0.3]])


@pytest.mark.parametrize(
    "gamma,lam,advantages,returns",
    [
        # gamma 1, lambda 0.95: delta_2 = 1.0 + 0 - 0.3 = 0.7;  delta_1 = -0.2 + 0.3 - 0.4 = -0.3;
        # delta_0 = 0.1 + 0.4 - 0.5 = 0.0.  A_2 = 0.7;  A_1 = -0.3 + 0.95 * 0.7 = 0.365;
        # A_0 = 0.0 + 0.95 * 0.365 = 0.34675.  R = A + V = 0.84675, 0.765, 1.0
        (1.0, 0.95, [0.34675, 0.365, 0.7], [0.84675, 0.765, 1.0]),
        # lambda 0 (one-step TD): A_t = delta_t = 0.0, -0.3, 0.7;  R = r_t + V_{t+1} = 0.5, 0.1, 1.0
        (1.0, 0.0, [0.0, -0.3, 0.7], [0.5, 0.1, 1.0]),
        # lambda 1 (Monte Carlo): R_t = sum of the rewards from t = 0.9, 0.8, 1.0;  A = R - V = 0.4, 0.4, 0.7
        (1.0, 1.0, [0.4, 0.4, 0.7], [0.9, 0.8, 1.0]),
        # gamma 0.5, lambda 1: discounted returns R_2 = 1.0, R_1 = -0.2 + 0.5 * 1.0 = 0.3,
        # R_0 = 0.1 + 0.5 * 0.3 = 0.25;  A = R - V = -0.25, -0.1, 0.7
        (0.5, 1.0, [-0.25, -0.1, 0.7], [0.25, 0.3, 1.0]),
    ],
)
def test_gae_three_tokens(gamma, lam, advantages, returns):
    adv, ret = ppo.compute_advantages(GAE_REWARDS, GAE_VALUES, torch.ones(1, 3), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([advantages]))
    torch.testing.assert_close(ret, torch.tensor([returns]))


def test_gae_stops_at_the_last_valid_token():
    # mask 1 1 0: the masked t=2 holds reward 9 and value 7, which must not leak into t=1.
    # gamma 1, lambda 0.95:  delta_1 = 1.0 + 0 (V after the last token) - 0.6 = 0.4, A_1 = 0.4;
    # delta_0 = 0.5 + 0.6 - 0.2 = 0.9, A_0 = 0.9 + 0.95 * 0.4 = 1.28.  R = A + V = 1.48, 1.0, and 0 where masked
    rewards = torch.tensor([[0.5, 1.0, 9.0]])
    values = torch.tensor([[0.2, 0.6, 7.0]])
    adv, ret = ppo.compute_advantages(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[1.28, 0.4, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.48, 1.0, 0.0]]))


def test_whiten_over_the_valid_tokens_only():
    # valid values 1, 2, 3, 4 (the two 100s are masked): mean 2.5, deviations -1.5, -0.5, 0.5, 1.5,
    # sum of squares 2.25 + 0.25 + 0.25 + 2.25 = 5, unbiased variance 5 / 3; divide by sqrt(5/3 + 1e-8)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    s = math.sqrt(5 / 3 + 1e-8)
    torch.testing.assert_close(ppo.whiten(x, mask), torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]]))


def test_whiten_adds_its_epsilon_to_the_variance():
    # values 0 and 1e-4: mean 5e-5, deviations -/+5e-5, unbiased variance 2 * 2.5e-9 / 1 = 5e-9, comparable to 1e-8:
    # 5e-5 / sqrt(5e-9 + 1e-8) = 5e-5 / 1.224745e-4 = 0.408248   (5e-5 / (sqrt(5e-9) + 1e-8) would give 0.707007)
    whitened = ppo.whiten(torch.tensor([[0.0, 1e-4]]), torch.ones(1, 2))
    torch.testing.assert_close(whitened, torch.tensor([[-0.408248, 0.408248]]), rtol=1e-4, atol=0)


def test_whiten_a_single_valid_token_gives_zero():
    # one valid value, 3 (the 100 is masked): mean 3, deviation 0; the unbiased variance 0 / (1 - 1) is taken as 0
    # (denominator clamped to 1), so (3 - 3) / sqrt(0 + 1e-8) = 0, not 0 / 0 = NaN
    x, mask = torch.tensor([[3.0, 100.0]]), torch.tensor([[1.0, 0.0]])
    assert ppo.masked_var(x, mask).item() == 0.0
    torch.testing.assert_close(ppo.whiten(x, mask), torch.tensor([[0.0, 0.0]]))


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def test_value_loss_clipping_active_and_inactive():
    # eps_v 0.2, five tokens (V_old, V, R); the fifth is masked:
    #   1. (0, 0.5, 1):    unclipped (0.5-1)^2 = 0.25; clip(V) = 0.2, (0.2-1)^2 = 0.64 -> clipped branch,
    #                      constant: grad 0
    #   2. (0, 0.1, 1):    V inside 0 +- 0.2, both branches (0.1-1)^2 = 0.81 -> grad (V - R)/4 = -0.9/4 = -0.225
    #   3. (0, 0.5, -1):   unclipped (0.5+1)^2 = 2.25 > clipped (0.2+1)^2 = 1.44 -> unclipped: grad 1.5/4 = 0.375
    #   4. (1, 0.5, 0):    clip(V) = 1 - 0.2 = 0.8, (0.8)^2 = 0.64 > (0.5)^2 = 0.25 -> clipped branch: grad 0
    # loss = 0.5 * (0.64 + 0.81 + 2.25 + 0.64) / 4 = 0.5 * 4.34 / 4 = 0.5425; d/dV of 0.5 (V-R)^2 / 4 = (V-R)/4
    values = torch.tensor([[0.5, 0.1, 0.5, 0.5, 3.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, metrics = ppo.compute_value_loss(values, old_values, returns, mask, 0.2, mask.sum())
    loss.backward()
    assert loss.item() == pytest.approx(0.5425)
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.225, 0.375, 0.0, 0.0]]))
    assert metrics["ppo/value_clip_frac"].item() == pytest.approx(0.5)  # tokens 1 and 4 of 4


def ppo_loss_in_grpo_signature(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta):
    """ppo.compute_policy_loss behind grpo.compute_policy_loss's signature (one advantage per sequence)."""
    assert ref_logp is None and beta == 0  # PPO's KL is in the reward, never in the loss
    return ppo.compute_policy_loss(logp, old_logp, advantages[:, None].expand_as(logp), mask, clip_eps, mask.sum())


def test_policy_loss_clipping_cases_shared_with_grpo(monkeypatch):
    # test_grpo's four one-token sequences (ratio 1.5 / 0.5 against A = +1 / -1, loss 0.15, gradients
    # 0, -0.125, 0, 0.375, clip_frac 0.5): with one token per sequence the token-mean equals GRPO's
    # seq-mean-token-mean, so the same hand-computed values must hold with PPO's loss in place of GRPO's
    monkeypatch.setattr(test_grpo.grpo, "compute_policy_loss", ppo_loss_in_grpo_signature)
    test_grpo.test_policy_loss_clipping_above_and_below()


def test_policy_loss_metrics_count_valid_tokens_on_the_clipped_side():
    # test_grpo's case with each row's advantage on all its tokens, as a token-mean: (-1.2 - 1 + 1)/3 = -0.4
    advantages = METRICS_ADV[:, None].expand(2, 2)
    loss, metrics = ppo.compute_policy_loss(METRICS_LOGP, torch.zeros(2, 2), advantages, METRICS_MASK, 0.2,
                                            torch.tensor(3.0))
    assert loss.item() == pytest.approx(-0.4)
    assert_token_metrics(metrics)


@pytest.mark.parametrize("num_tokens", [None, 6.0])  # None: this batch's own 3 tokens
def test_policy_loss_is_a_token_mean_with_per_token_advantages(num_tokens):
    # ratio 1 everywhere, per-token advantages (row 1's second token is masked, its A = 7 must be ignored):
    # per-token loss -A = -1, 2, -0.5, sum 0.5. Token-mean over the n = 3 valid tokens: 0.5 / 3;
    # with the minibatch's count passed as the normaliser (6): 0.5 / 6. Gradient -A / n.
    # (GRPO's seq-mean-token-mean would give ((-1 + 2) / 2 - 0.5) / 2 = 0.)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0], [0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    n = 3.0 if num_tokens is None else num_tokens
    loss, metrics = ppo.compute_policy_loss(logp, logp.detach().clone(), advantages, mask, 0.2, torch.tensor(n))
    loss.backward()
    assert loss.item() == pytest.approx(0.5 / n)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0 / n, 2.0 / n], [-0.5 / n, 0.0]]))
    assert metrics["loss/policy"].item() == pytest.approx(0.5 / 3)  # the metric is this batch's own token-mean


# ---------------------------------------------------------------------------------------------------------
# The critic
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def critic():
    """The tiny critic with a random head (the real one starts at zero, which would hide every gradient)."""
    critic = common.load_critic("tiny", CPU)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        critic.score.weight.copy_(0.1 * torch.randn(critic.score.weight.shape, generator=generator))
        critic.score.bias.fill_(0.3)
    return critic


def test_critic_is_the_policy_backbone_with_a_zero_head(tiny):
    _, tokenizer, _ = tiny
    fresh = common.load_critic("tiny", CPU)
    policy = common.load_model("tiny", CPU)
    backbone = dict(policy.base_model.named_parameters())
    assert all(torch.equal(p, backbone[name]) for name, p in fresh.base_model.named_parameters())
    ids = tokenizer(["1+2=3", "13+4=17"], return_tensors="pt", padding=True, add_special_tokens=False)
    P = ids.input_ids.shape[1] - 4  # prompt columns: completions are the last 4 tokens
    rollout = common.Rollout(ids.input_ids[:, :P], ids.attention_mask[:, :P], ids.input_ids[:, P:],
                             torch.ones(2, 4), torch.tensor([4, 4]), torch.tensor([True, True]), torch.zeros(2, 4))
    values = ppo.completion_values(fresh, rollout)
    assert values.shape == (2, 4) and torch.equal(values, torch.zeros_like(values))


def test_values_are_read_at_the_state_before_each_token(tiny, critic):
    # the same prompt "1+2=" followed by "3" + "0" and by "7" + "0": V_0 is the value of the prompt alone, so
    # it must be equal in both rows; V_1 has seen the first completion token, which differs. Reading one
    # position later (P + t instead of P - 1 + t) would make V_0 differ.
    _, tokenizer, _ = tiny
    prompt = tokenizer("1+2=", add_special_tokens=False).input_ids
    a, b, z = (tokenizer(c, add_special_tokens=False).input_ids[0] for c in "370")
    prompt_ids, completion_ids = torch.tensor([prompt, prompt]), torch.tensor([[a, z], [b, z]])
    rollout = common.Rollout(prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones(2, 2),
                             torch.tensor([2, 2]), torch.tensor([True, True]), torch.zeros(2, 2))
    values = ppo.completion_values(critic, rollout)
    assert values.shape == (2, 2)
    torch.testing.assert_close(values[0, 0], values[1, 0])
    assert (values[0, 1] - values[1, 1]).abs() > 1e-4


def test_micro_batches_accumulate_the_whole_minibatch_gradient(tiny_rollout, critic):  # noqa: F811
    model, rollout = tiny_rollout
    assert rollout.lengths.unique().numel() > 1  # unequal lengths: a per-micro-batch token-mean would differ
    args = ppo.resolve_args(ppo.Args(ent_coef=0.1))  # every term of the total loss is live
    B, T = rollout.completion_ids.shape  # 3 prompts x 4 = 12 rows
    # off-policy old log-probs and old values, so the clipping of both losses is live on some tokens
    torch.manual_seed(1)
    old_logp = off_policy_logprobs(model, rollout, 0.3)
    with torch.no_grad():
        old_values = ppo.completion_values(critic, rollout)
    old_values = old_values + 0.3 * torch.randn_like(old_values)
    advantages, returns, minibatch = torch.randn(B, T), torch.randn(B, T), torch.randperm(B)
    # the policy's and the critic's gradients, checked together as one module list
    assert_micro_batches_add_up(
        torch.nn.ModuleList([model, critic]),
        lambda m: ppo.accumulate_gradients(
            model, critic, rollout, old_logp, old_values, advantages, returns, minibatch, m, args
        ),
        B, [3, 1],
    )
    assert all(torch.cat([p.grad.flatten() for p in m.parameters()]).abs().sum() > 0 for m in (model, critic))


@pytest.mark.parametrize("script", [ppo, gfpo])
def test_entropy_loss_by_hand(script):
    # entropies 0.5, 1.0 | 2.0, (9.9 masked): token-mean (0.5 + 1.0 + 2.0) / 3 = 7/6, the loss is -7/6;
    # as one micro-batch of a 7-token minibatch: -3.5 / 7 = -0.5; d loss / d entropy = -mask / 7
    entropy = torch.tensor([[0.5, 1.0], [2.0, 9.9]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert script.compute_entropy_loss(entropy, mask, mask.sum()).item() == pytest.approx(-7 / 6)
    loss = script.compute_entropy_loss(entropy, mask, torch.tensor(7.0))
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    torch.testing.assert_close(entropy.grad, -mask / 7)


def test_entropy_bonus_adds_its_gradient_to_the_policy(tiny_rollout, critic):  # noqa: F811
    model, rollout = tiny_rollout
    B, T = rollout.completion_ids.shape
    torch.manual_seed(2)
    old_logp = off_policy_logprobs(model, rollout, 0.3)
    old_values, advantages, returns = torch.zeros(B, T), torch.randn(B, T), torch.randn(B, T)
    assert_entropy_bonus_adds_its_gradient(
        model, rollout,
        lambda ent_coef: ppo.accumulate_gradients(
            model, critic, rollout, old_logp, old_values, advantages, returns, torch.arange(B), B,
            ppo.resolve_args(ppo.Args(ent_coef=ent_coef)),
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

BAD_INPUT = [
    (dict(samples_per_prompt=0), "--samples-per-prompt"),
    (dict(num_prompts=0), "--num-prompts"),
    (dict(gamma=1.5), "--gamma"),
    (dict(gamma=-0.1), "--gamma"),
    (dict(lam=1.01), "--lam"),
    (dict(lam=-0.5), "--lam"),
    (dict(vf_coef=-0.1), "--vf-coef"),
    (dict(ent_coef=-0.01), "--ent-coef"),
    (dict(clip_eps_value=-0.2), "--clip-eps-value"),
    (dict(critic_learning_rate=0.0), "--critic-learning-rate"),
    (dict(beta=-0.05), "--beta"),
    (dict(missing_eos_penalty=-1.0), "--missing-eos-penalty"),
    (dict(num_prompts=8, num_minibatches=3), "--num-minibatches"),  # 8 x 1 completions do not split in 3
]


@pytest.mark.parametrize("fields,name", BAD_INPUT)
def test_bad_input_is_rejected(fields, name):
    with pytest.raises(common.UserError, match=re.escape(name)):
        ppo.validate_args(ppo.resolve_args(ppo.Args(**fields)))


@pytest.mark.parametrize("fields", [dict(gamma=0.0, lam=0.0), dict(gamma=1.0, lam=1.0, missing_eos_penalty=0.0)])
def test_range_ends_are_accepted(fields):
    ppo.validate_args(ppo.resolve_args(ppo.Args(**fields)))
