"""GFPO math (gfpo.py) against cases worked out by hand, and GFPO-specific runs and bad input."""

import math

import pytest
import torch

import common
import gfpo
from test_grpo import METRICS_ADV, METRICS_LOGP, METRICS_MASK, assert_token_metrics
from test_grpo import assert_entropy_bonus_adds_its_gradient, assert_micro_batches_add_up, off_policy_logprobs
from test_grpo import assert_on_policy_shortcut_equals_the_old_logprob_pass, loss_grad_metrics
from test_grpo import tiny_rollout  # noqa: F401  (a fixture: 3 prompts x 4 completions of the tiny model)
from test_scripts import check_bad_input

T, F = True, False


@pytest.mark.parametrize(
    "metric,rewards,lengths,group_size,k,expected",
    [
        # length: lengths 3,2,3,1,2,3 rank as idx 3 (1), idx 1 (2), idx 4 (2, tie with idx 1: lower index first),
        # then idx 0, 2, 5 (all 3)
        ("length", [0, 0, 0, 0, 0, 0], [3, 2, 3, 1, 2, 3], 6, 2, [F, T, F, T, F, F]),
        ("length", [0, 0, 0, 0, 0, 0], [3, 2, 3, 1, 2, 3], 6, 3, [F, T, F, T, T, F]),
        ("length", [0, 0, 0, 0, 0, 0], [3, 2, 3, 1, 2, 3], 6, 4, [T, T, F, T, T, F]),
        # token_efficiency: reward / length = 1/4, 0/2, 1/2, 1/3, 0/2, 0/4 = 0.25, 0, 0.5, 0.333, 0, 0
        # rank: idx 2, idx 3, idx 0, then the three zeros by index: 1, 4, 5
        # (length would have kept idx 1, 2, 4 first: the two-token ones)
        ("token_efficiency", [1, 0, 1, 1, 0, 0], [4, 2, 2, 3, 2, 4], 6, 2, [F, F, T, T, F, F]),
        ("token_efficiency", [1, 0, 1, 1, 0, 0], [4, 2, 2, 3, 2, 4], 6, 4, [T, T, T, T, F, F]),
        ("token_efficiency", [1, 0, 1, 1, 0, 0], [4, 2, 2, 3, 2, 4], 6, 5, [T, T, T, T, T, F]),
        # negative rewards: -1/2 = -0.5, -1/4 = -0.25, 1/8 = 0.125, 0/1 = 0 -> rank idx 2, 3, 1, 0:
        # among wrong answers the longer one is the more efficient
        ("token_efficiency", [-1, -1, 1, 0], [2, 4, 8, 1], 4, 3, [F, T, T, T]),
        # one k per prompt: group 0 all length 2 -> the first 2 by index; group 1 lengths 5,1,1,3 -> idx 1, 2, 3
        ("length", [0] * 8, [2, 2, 2, 2, 5, 1, 1, 3], 4, [2, 3], [T, T, F, F, F, T, T, T]),
    ],
)
def test_select_retained(metric, rewards, lengths, group_size, k, expected):
    keep = gfpo.select_retained(
        torch.tensor(rewards, dtype=torch.float32), torch.tensor(lengths), group_size,
        torch.tensor(k) if isinstance(k, list) else k, metric,
    )
    assert keep.tolist() == expected


@pytest.mark.parametrize(
    "rewards,keep,group_size,eps,expected",
    [
        # S = rewards 1,0,0,1 (idx 4, 5 dropped): mean 0.5, deviations +-0.5, population var 4*0.25/4 = 0.25,
        # std 0.5 (the unbiased one would be sqrt(1/3) = 0.577); + eps -> 0.5001; dropped -> 0
        ([1, 0, 0, 1, 1, 0], [T, T, T, T, F, F], 6, 1e-4, [0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001, 0, 0]),
        # S = 0, 1, 2 (the dropped 5 must not move the mean): mean 1, population var (1+0+1)/3 = 2/3,
        # std sqrt(2/3) -> -1/sqrt(2/3) = -sqrt(1.5), 0, +sqrt(1.5)
        ([0, 5, 1, 2], [T, F, T, T], 4, 0.0, [-math.sqrt(1.5), 0, 0, math.sqrt(1.5)]),
        # group 0: S = 1, 1 (all equal; the dropped 0s differ) -> all zero
        # group 1: S = 0, 1, 0 (k = 3): mean 1/3, deviations -1/3, 2/3, -1/3, population var (1/9+4/9+1/9)/3 = 2/9,
        # std sqrt(2)/3 = 0.471405 -> (-1/3) / (0.471405 + 1e-4), (2/3) / (0.471405 + 1e-4), ...
        (
            [1, 1, 0, 0, 0, 1, 0, 3], [T, T, F, F, T, T, T, F], 4, 1e-4,
            [0, 0, 0, 0, (-1 / 3) / (math.sqrt(2) / 3 + 1e-4), (2 / 3) / (math.sqrt(2) / 3 + 1e-4),
             (-1 / 3) / (math.sqrt(2) / 3 + 1e-4), 0],
        ),
    ],
)
def test_advantages_over_the_retained_set(rewards, keep, group_size, eps, expected):
    adv = gfpo.compute_advantages(torch.tensor(rewards, dtype=torch.float32), torch.tensor(keep), group_size, eps)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))


def loss_and_grad(logp, old_logp, ref_logp, adv, mask, num_tokens, clip_eps=0.2, beta=0.0):
    return loss_grad_metrics(gfpo.compute_policy_loss, logp, old_logp, ref_logp, adv, mask, clip_eps, beta, num_tokens)


# two completions, 2 tokens and 1 token, A = +1 and -0.5, on-policy (ratio 1)
LOGP = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
ADV = torch.tensor([1.0, -0.5])


def test_policy_loss_token_mean():
    # per-token loss -A: -1, -1 and +0.5; token-mean (-1 - 1 + 0.5) / 3 = -0.5 (seq-mean would give -0.25)
    # d loss / d logp = -A * ratio / 3: row 0 -1/3 each, row 1 0.5/3 = 1/6, its masked token 0
    loss, grad, metrics = loss_and_grad(LOGP, LOGP.clone(), None, ADV, MASK, num_tokens=3)
    assert loss == pytest.approx(-0.5)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 3, -1 / 3], [1 / 6, 0.0]]))
    assert metrics["policy/clip_frac"].item() == 0.0


@pytest.mark.parametrize("row,loss_value,grad_row", [(0, -2 / 3, [-1 / 3, -1 / 3]), (1, 1 / 6, [1 / 6, 0.0])])
def test_policy_loss_micro_batch_uses_the_minibatch_token_count(row, loss_value, grad_row):
    # the same minibatch one row at a time, each divided by the minibatch's 3 tokens:
    # row 0: (-1 - 1) / 3 = -2/3, row 1: 0.5 / 3 = 1/6; they add up to the whole minibatch's -0.5, with the same
    # gradients; the micro-batch's own token-mean is still what `loss/policy` reports (-1 and +0.5)
    rows = slice(row, row + 1)
    loss, grad, metrics = loss_and_grad(LOGP[rows], LOGP[rows].clone(), None, ADV[rows], MASK[rows], num_tokens=3)
    assert loss == pytest.approx(loss_value)
    torch.testing.assert_close(grad, torch.tensor([grad_row]))
    assert metrics["loss/policy"].item() == pytest.approx([-1.0, 0.5][row])


def test_policy_loss_symmetric_clip_and_outer_token_count():
    # four one-token sequences, eps 0.2 (0.8..1.2), per-token loss as worked in test_grpo's clipping case:
    #   -1.2 (clipped), -0.5, +0.8 (clipped), +1.5 -> sum 0.6; gradient -ratio*A: 0, -0.5, 0, +1.5
    # num_tokens 8 (the minibatch holds 4 more tokens in another micro-batch): loss 0.6/8 = 0.075,
    # gradients 0, -0.5/8 = -0.0625, 0, 1.5/8 = 0.1875
    logp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, grad, metrics = loss_and_grad(logp, torch.zeros(4, 1), None, adv, torch.ones(4, 1), num_tokens=8)
    assert loss == pytest.approx(0.075)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [-0.0625], [0.0], [0.1875]]))
    assert metrics["policy/clip_frac"].item() == pytest.approx(0.5)  # 2 of this micro-batch's 4 tokens


def test_policy_loss_k3_term_is_token_mean():
    # A = 0, beta 0.1; row 0 has 1 token, row 1 has 2:
    #   row 0: ref - logp = ln 2  -> k3 = 2 - ln 2 - 1 = 0.306853   (its masked token is off by 5: ignored)
    #   row 1: ref - logp = -ln 2 -> k3 = 0.5 + ln 2 - 1 = 0.193147; ref - logp = 0 -> k3 = 0
    # loss = 0.1 * (0.306853 + 0.193147 + 0) / 3 = 0.1 * 0.5 / 3 = 0.0166667
    # d k3 / d logp = 1 - exp(ref - logp): -1, 0.5, 0; times 0.1 / 3 -> -0.0333333, 0.0166667, 0
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -0.5]])
    ref = logp + torch.tensor([[math.log(2), 5.0], [-math.log(2), 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss, grad, metrics = loss_and_grad(logp, logp.clone(), ref, torch.zeros(2), mask, num_tokens=3, beta=0.1)
    assert loss == pytest.approx(0.1 * 0.5 / 3)
    torch.testing.assert_close(grad, torch.tensor([[-0.1 / 3, 0.0], [0.05 / 3, 0.0]]))
    assert metrics["loss/kl"].item() == pytest.approx(0.5 / 3)


def test_policy_loss_metrics_count_valid_tokens_on_the_clipped_side():
    # test_grpo's case as a token-mean: (-1.2 - 1 + 1)/3 = -0.4; the reference is off only on the masked token
    ref = METRICS_LOGP + torch.tensor([[0.0, 0.0], [0.0, math.log(2)]])
    loss, _, metrics = loss_and_grad(METRICS_LOGP, torch.zeros(2, 2), ref, METRICS_ADV, METRICS_MASK, num_tokens=3,
                                     beta=0.1)
    assert loss == pytest.approx(-0.4)
    assert_token_metrics(metrics)
    assert metrics["loss/kl"].item() == pytest.approx(0.0)


def test_micro_batches_accumulate_the_whole_minibatch_gradient(tiny_rollout):  # noqa: F811
    model, rollout = tiny_rollout
    args = gfpo.resolve_args(gfpo.Args(beta=0.04))
    B = rollout.input_ids.shape[0]  # 12 rows
    old_logp = off_policy_logprobs(model, rollout, 0.3)  # off-policy, so the clip is live
    ref_logp = old_logp - 0.2
    advantages, minibatch = torch.randn(B), torch.randperm(B)
    assert_micro_batches_add_up(  # 5 + 5 + 2 rows: uneven is exact too
        model,
        lambda m: gfpo.accumulate_gradients(model, rollout, old_logp, ref_logp, advantages, minibatch, m, args),
        B, [5, 1],
    )


def test_on_policy_shortcut_equals_the_old_logprob_pass(tiny_rollout):  # noqa: F811
    # gfpo.py's default schedule (one epoch, one minibatch) always takes this shortcut
    model, rollout = tiny_rollout
    args = gfpo.resolve_args(gfpo.Args(beta=0.04))

    def accumulate(old, ref, adv, rows):
        return gfpo.accumulate_gradients(model, rollout, old, ref, adv, rows, len(rows), args)["loss/policy"]

    assert_on_policy_shortcut_equals_the_old_logprob_pass(model, rollout, accumulate)


def test_entropy_bonus_adds_its_gradient_to_the_policy(tiny_rollout):  # noqa: F811
    model, rollout = tiny_rollout
    B = rollout.input_ids.shape[0]
    torch.manual_seed(2)
    old_logp, advantages = off_policy_logprobs(model, rollout, 0.3), torch.randn(B)
    assert_entropy_bonus_adds_its_gradient(
        model, rollout,
        lambda ent_coef: gfpo.accumulate_gradients(
            model, rollout, old_logp, None, advantages, torch.arange(B), B,
            gfpo.resolve_args(gfpo.Args(beta=0.0, ent_coef=ent_coef)),
        ),
    )


HISTORY_QUARTERS = [0.0, 0.25, 0.5, 0.75, 1.0]  # 5 values: quartile positions 0.25*4 = 1, 2, 3 -> 0.25, 0.5, 0.75


@pytest.mark.parametrize(
    "difficulty,history,k,min_history,expected",
    [
        # warm-up: 4 values < 5 needed -> every prompt keeps k, whatever its difficulty
        ([0.0, 0.5, 1.0], HISTORY_QUARTERS[:4], 8, 5, [8, 8, 8]),
        # exactly 5 values: active. Buckets: below q25 -> 8; q25 <= d < q50 -> 8; q50 <= d < q75 -> 6; else 4.
        # Each quartile itself is not below it: 0.25 -> 8, 0.5 -> 6, 0.75 -> 4
        ([0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 1.0], HISTORY_QUARTERS, 8, 5, [8, 8, 8, 6, 6, 4, 4]),
        # interpolated quartiles of 0..7: positions 7*0.25 = 1.75, 3.5, 5.25 -> q25 1.75, q50 3.5, q75 5.25
        ([1.5, 1.75, 3.49, 3.5, 5.0, 5.25, 7.0], [float(i) for i in range(8)], 8, 8, [8, 8, 8, 6, 6, 4, 4]),
        # k = 4 scales the buckets: 4, 4, ceil(3*4/4) = 3, ceil(4/2) = 2
        ([0.0, 0.3, 0.5, 0.9], HISTORY_QUARTERS, 4, 5, [4, 4, 3, 2]),
        # k = 2: 2, 2, ceil(1.5) = 2, ceil(1) = 1 -> raised to 2 (a retained set of 1 compares nothing)
        ([0.0, 0.3, 0.5, 0.9], HISTORY_QUARTERS, 2, 5, [2, 2, 2, 2]),
        # k = 5, where ceil and floor differ: 5, 5, ceil(15/4 = 3.75) = 4, ceil(5/2 = 2.5) = 3
        ([0.0, 0.3, 0.5, 0.9], HISTORY_QUARTERS, 5, 5, [5, 5, 4, 3]),
        # tied history 0,0,0,1,1: positions 1, 2, 3 -> q25 = q50 = 0, q75 = 1: difficulty 0 is not below q25 or
        # q50 but below q75 -> 6; difficulty 1 -> 4
        ([0.0, 1.0], [0.0, 0.0, 0.0, 1.0, 1.0], 8, 5, [6, 4]),
    ],
)
def test_adaptive_k(difficulty, history, k, min_history, expected):
    ks = gfpo.adaptive_k(torch.tensor(difficulty), torch.tensor(history), k, min_history)
    assert ks.tolist() == expected


@pytest.mark.parametrize("k,rows", [(8, 16), (4, 8)])
def test_filtered_completions_get_no_forward_pass(monkeypatch, k, rows):
    # 2 prompts x k retained of G = 16: every log-prob pass (reference, policy update; the old one is skipped
    # on-policy) sees 2k rows, never the 32 sampled
    seen = []
    completion_logprobs = common.completion_logprobs

    def spy(model, rollout, *args, **kwargs):
        seen.append(len(rollout.lengths))
        return completion_logprobs(model, rollout, *args, **kwargs)

    monkeypatch.setattr(common, "completion_logprobs", spy)
    gfpo.main(gfpo.Args(num_steps=1, num_prompts=2, k=k, eval_every=0))
    assert seen == [rows, rows]


@pytest.mark.parametrize(
    "args,names",
    [
        (["--k", "16"], "--k"),  # k = G: nothing is filtered (that is GRPO)
        (["--k", "1"], "--k"),  # a retained set of one compares nothing
        (["--group-size", "8"], "--k"),  # the default k = 8 is no longer below G
        (["--group-size", "1"], "--group-size"),
        (["--clip-eps", "-0.1"], "--clip-eps"),
        (["--ent-coef", "-0.001"], "--ent-coef"),
        (["--num-minibatches", "256"], "--num-minibatches"),  # divides the 256 sampled, not the 16 x 8 = 128 retained
        (["--micro-batch-size", "256"], "--micro-batch-size"),  # the minibatch is the 128 retained rows
        # 128 divides the 16 x 8 retained, but --adaptive-k can retain 16 x ceil(8 / 2) = 64: empty minibatches
        (["--adaptive-k", "--num-minibatches", "128"], "--num-minibatches 128: --adaptive-k may retain"),
    ],
)
def test_bad_gfpo_input(args, names, tmp_path):
    check_bad_input("gfpo.py", args, names, tmp_path)


def test_adaptive_k_allows_as_many_minibatches_as_its_fewest_rows():
    # 16 prompts x max(2, ceil(8 / 2)) = 64 rows at the least: 64 minibatches of one row each are allowed, 65 not
    gfpo.validate_args(gfpo.resolve_args(gfpo.Args(adaptive_k=True, num_minibatches=64)))
    with pytest.raises(common.UserError, match="--num-minibatches 65"):
        gfpo.validate_args(gfpo.resolve_args(gfpo.Args(adaptive_k=True, num_minibatches=65)))


def test_unknown_metric_is_a_user_error(tmp_path):
    check_bad_input("gfpo.py", ["--metric", "shortest"], "--metric shortest", tmp_path)
