"""DAPO (dapo.py) against cases worked out by hand, and the script's DAPO-only paths in a subprocess."""

import json
import re

import pytest
import torch

import common
import dapo
from test_grpo import loss_and_grad as grpo_loss_and_grad
from test_grpo import loss_grad_metrics
from test_grpo import METRICS_ADV, METRICS_LOGP, METRICS_MASK, assert_token_metrics
from test_grpo import assert_micro_batches_add_up, assert_on_policy_shortcut_equals_the_old_logprob_pass
from test_grpo import off_policy_logprobs
from test_grpo import tiny_rollout  # noqa: F401  (fixture: 3 prompts x 4 completions of the tiny model)
from test_scripts import check_bad_input, run, write


def loss_and_grad(logp, old_logp, adv, mask, num_tokens, eps_low=0.2, eps_high=0.28):
    return loss_grad_metrics(dapo.compute_policy_loss, logp, old_logp, adv, mask, eps_low, eps_high, num_tokens)


def test_clip_higher_lets_a_ratio_of_1_25_through_where_grpo_clips():
    # four one-token sequences; DAPO clips the ratio to 0.8..1.28, GRPO (eps 0.2) to 0.8..1.2:
    #   ratio 1.25, A=+1: DAPO min(1.25, 1.25) = 1.25 unclipped -> loss -1.25, d/dlogp = -ratio*A = -1.25
    #                     GRPO min(1.25, 1.2) = 1.2 clipped     -> loss -1.2, gradient 0
    #   ratio 1.3,  A=+1: DAPO min(1.3, 1.28) = 1.28 clipped    -> loss -1.28, gradient 0 (GRPO: -1.2, 0)
    #   ratio 0.75, A=-1: both min(-0.75, -0.8) = -0.8 clipped  -> loss 0.8, gradient 0 (same lower bound)
    #   ratio 0.85, A=-1: both min(-0.85, -0.8) = -0.85         -> loss 0.85, d/dlogp = -ratio*A = 0.85
    # DAPO token-mean over 4 tokens: (-1.25 - 1.28 + 0.8 + 0.85)/4 = -0.88/4 = -0.22; gradients / 4
    # GRPO, one token per sequence: (-1.2 - 1.2 + 0.8 + 0.85)/4 = -0.75/4 = -0.1875
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.25], [1.3], [0.75], [0.85]]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4, 1)
    loss, grad, metrics = loss_and_grad(logp, old, adv, mask, num_tokens=4)
    assert loss == pytest.approx(-0.22)
    torch.testing.assert_close(grad, torch.tensor([[-1.25 / 4], [0.0], [0.0], [0.85 / 4]]))
    assert metrics["policy/clip_frac"].item() == pytest.approx(2 / 4)  # ratio 1.3 (A>0) and 0.75 (A<0)
    # ratio 1.25 alone: below 1.28, not clipped (with the two bounds swapped, 1.25 > 1.2 would count)
    assert loss_and_grad(logp[:1], old[:1], adv[:1], mask[:1], num_tokens=1)[2]["policy/clip_frac"].item() == 0.0
    grpo_loss, grpo_grad, grpo_metrics = grpo_loss_and_grad(logp, old, None, adv, mask, clip_eps=0.2)
    assert grpo_loss == pytest.approx(-0.1875)
    torch.testing.assert_close(grpo_grad, torch.tensor([[0.0], [0.0], [0.0], [0.85 / 4]]))
    assert grpo_metrics["policy/clip_frac"].item() == pytest.approx(3 / 4)  # 1.25 is clipped too


# A = 1 for both rows, per-token loss -ratio wherever the ratio stays below 1.28:
#   row 0, 3 tokens, ratios 1, 1.1, 0.9 (loss sum -3.0)
#   row 1, 1 token, ratio 1.1, or 1.3 clipped to 1.28; its masked positions hold ratio 5, which must be ignored
UNEQUAL_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def unequal_logp(row1_ratio):
    return torch.log(torch.tensor([[1.0, 1.1, 0.9], [row1_ratio, 5.0, 5.0]]))


def test_token_mean_weighs_every_token_equally_on_unequal_lengths():
    # token-mean: (-3.0 - 1.1) / 4 tokens = -1.025   (GRPO's seq-mean-token-mean: (-3.0/3 - 1.1/1)/2 = -1.05)
    # d loss / d logp = -ratio / 4 on every token: -0.25, -0.275, -0.225 | -0.275
    #   (seq-mean gives row 0 -ratio/6 and row 1 -ratio/2: there the lone token weighs 3x a row-0 token)
    logp, old, adv = unequal_logp(1.1), torch.zeros(2, 3), torch.tensor([1.0, 1.0])
    loss, grad, _ = loss_and_grad(logp, old, adv, UNEQUAL_MASK, num_tokens=4)
    assert loss == pytest.approx(-1.025)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.275, -0.225], [-0.275, 0.0, 0.0]]))
    grpo_loss, grpo_grad, _ = grpo_loss_and_grad(logp, old, None, adv, UNEQUAL_MASK)
    assert grpo_loss == pytest.approx(-1.05)
    torch.testing.assert_close(grpo_grad, torch.tensor([[-1 / 6, -1.1 / 6, -0.9 / 6], [-1.1 / 2, 0.0, 0.0]]))


def test_policy_loss_metrics_count_valid_tokens_on_the_clipped_side():
    # test_grpo's case: ratio 1.5 with A > 0 is above 1.28 too; token-mean (-1.28 - 1 + 1)/3 = -1.28/3
    loss, _, metrics = loss_and_grad(METRICS_LOGP, torch.zeros(2, 2), METRICS_ADV, METRICS_MASK, num_tokens=3)
    assert loss == pytest.approx(-1.28 / 3)
    assert_token_metrics(metrics)


def test_micro_batches_divide_by_the_minibatch_token_count_and_add_up():
    # row 1's ratio 1.3 is clipped to 1.28 (A > 0): one clipped token of the minibatch's 4
    # whole minibatch: (-3.0 - 1.28)/4 = -1.07, clip_frac 1/4
    # one row per micro-batch, both divided by the minibatch's 4 tokens: row 0 -3.0/4 = -0.75, clip_frac 0;
    #   row 1 -1.28/4 = -0.32, clip_frac 1/4; sums -1.07 and 1/4, the minibatch's
    #   (each micro-batch's own count would give -3.0/3 - 1.28/1 = -2.28)
    # gradients: row 0 -ratio/4 = -0.25, -0.275, -0.225; row 1 clipped: 0
    logp, old, adv = unequal_logp(1.3), torch.zeros(2, 3), torch.tensor([1.0, 1.0])
    whole = loss_and_grad(logp, old, adv, UNEQUAL_MASK, num_tokens=4)
    parts = [loss_and_grad(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], UNEQUAL_MASK[i : i + 1], 4) for i in (0, 1)]
    assert [whole[0], parts[0][0], parts[1][0]] == pytest.approx([-1.07, -0.75, -0.32])
    expected_grad = torch.tensor([[-0.25, -0.275, -0.225], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(whole[1], expected_grad)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), expected_grad)
    clip_fracs = [m["policy/clip_frac"].item() for m in (whole[2], parts[0][2], parts[1][2])]
    assert clip_fracs == pytest.approx([0.25, 0.0, 0.25])


@pytest.mark.parametrize(
    "max_len,cache_len,lengths,expected",
    [
        # L_max 10, L_cache 4: no penalty up to 10 - 4 = 6 tokens (6 included); then (6 - |y|)/4:
        # 7 -> -0.25, 8 -> -0.5, 10 -> -1 (L_max included); beyond L_max a flat -1: 12 -> -1, not (6-12)/4 = -1.5
        (10, 4, [1, 6, 7, 8, 10, 11, 12], [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]),
        # the paper's 20480 and 4096: free up to 16384; 16385 -> -1/4096; 18432 -> -2048/4096 = -0.5
        (20480, 4096, [16384, 16385, 18432, 20480, 20481], [0.0, -1 / 4096, -0.5, -1.0, -1.0]),
        # L_cache 0 (as with --max-new-tokens 4: 4 // 5): no linear part and no 0/0, free up to L_max = 4, then -1
        (4, 0, [1, 4, 5], [0.0, 0.0, -1.0]),
        # L_cache = L_max: the line starts at 0 tokens: 1 -> -1/4, 3 -> -3/4, 4 -> -1, 5 -> -1
        (4, 4, [1, 3, 4, 5], [-0.25, -0.75, -1.0, -1.0]),
    ],
)
def test_overlong_penalty_branches_and_boundaries(max_len, cache_len, lengths, expected):
    # eq. 13 is continuous (0 at L_max - L_cache, -1 at L_max), so each boundary is checked with the lengths
    # on it and next to it: the first past L_max - L_cache is the first penalised, the first past L_max stays at -1
    penalty = dapo.overlong_penalty(torch.tensor(lengths), max_len, cache_len)
    torch.testing.assert_close(penalty, torch.tensor(expected))


@pytest.mark.parametrize(
    "rewards,group_size,expected",
    [
        # G = 4: all right, all wrong, one right, three right -> dropped, dropped, kept, kept
        ([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1], 4, [False, False, True, True]),
        # G = 2 with non-binary rewards: only exactly equal rewards are dropped
        ([0.75, 0.75, 1.0, 0.75, -1.0, -1.0, 0.0, -0.25], 2, [False, True, False, True]),
        # a single mixed group of 3, the odd one last
        ([1, 1, 0], 3, [True]),
    ],
)
def test_filter_groups_keeps_groups_with_unequal_rewards(rewards, group_size, expected):
    keep = dapo.filter_groups(torch.tensor(rewards, dtype=torch.float32), group_size)
    assert keep.dtype == torch.bool and keep.tolist() == expected


def test_micro_batches_accumulate_the_whole_minibatch_gradient(tiny_rollout):  # noqa: F811
    model, rollout = tiny_rollout
    args = dapo.resolve_args(dapo.Args())
    B = rollout.input_ids.shape[0]  # 3 prompts x 4 = 12 rows
    assert rollout.lengths.unique().numel() > 1  # unequal lengths: micro-batches hold unequal token counts
    old_logp = off_policy_logprobs(model, rollout, 0.3)  # off-policy, so both clip bounds are live
    advantages = torch.randn(B)
    minibatch = torch.randperm(B)[:9]  # 9 of the 12 rows: the normaliser is their token count, not the rollout's

    def accumulate(micro_batch_size):
        return dapo.accumulate_gradients(model, rollout, old_logp, advantages, minibatch, micro_batch_size, args)

    assert_micro_batches_add_up(model, accumulate, 9, [4, 1])  # 4 + 4 + 1 rows, and 9 x 1 row


def test_on_policy_shortcut_equals_the_old_logprob_pass(tiny_rollout):  # noqa: F811
    model, rollout = tiny_rollout
    args = dapo.resolve_args(dapo.Args())

    def accumulate(old, ref, adv, rows):
        return dapo.accumulate_gradients(model, rollout, old, adv, rows, len(rows), args)["loss/policy"]

    assert_on_policy_shortcut_equals_the_old_logprob_pass(model, rollout, accumulate)


@pytest.mark.parametrize(
    "args,expected",
    [
        # the tiny preset: max_new_tokens 40 -> L_cache 40 // 5 = 8, 4 minibatches
        (dict(), (40, 8, 4)),
        # the paper preset: max_new_tokens 512 -> L_cache 512 // 5 = 102, 16 optimizer steps per rollout batch
        (dict(preset="paper"), (512, 102, 16)),
        # an explicit buffer is kept
        (dict(overlong_buffer=3), (40, 3, 4)),
    ],
)
def test_resolve_args_overlong_buffer_and_minibatches(args, expected):
    resolved = dapo.resolve_args(dapo.Args(**args))
    assert (resolved.max_new_tokens, resolved.overlong_buffer, resolved.num_minibatches) == expected


BAD_INPUT = [
    (["--clip-eps-high", "0.1"], "--clip-eps-high"),  # below --clip-eps-low's 0.2
    (["--clip-eps-low", "-0.1"], "--clip-eps-low"),
    (["--clip-eps-low", "0", "--clip-eps-high", "-0.1"], "--clip-eps-high"),
    (["--overlong-buffer", "-1"], "--overlong-buffer"),
    (["--overlong-buffer", "41"], "--overlong-buffer"),  # the tiny preset's --max-new-tokens is 40
    (["--max-gen-batches", "0"], "--max-gen-batches"),
]


@pytest.mark.parametrize("args,names", BAD_INPUT)
def test_bad_dapo_input(args, names, tmp_path):
    check_bad_input("dapo.py", args, names, tmp_path)


STEP_LINE = re.compile(r"step (\d+): reward \S+\s+loss (\S+)\s+batches (\d+)\s+kept (\d+)")


@pytest.mark.parametrize(
    "args,fewer",
    [
        # G = 4 at the start of training: some groups are all wrong (or all right), so rounds beyond the first
        # are needed and the last one's surplus is cut; every step trains on exactly 16 groups
        (["--group-size", "4"], False),
        # G = 2 and a single round: most pairs are equal, fewer than 16 groups survive and are trained on;
        # with truncated completions masked out, 4 minibatches of 8 rows (some short) and micro-batches of 2
        (["--group-size", "2", "--max-gen-batches", "1", "--mask-truncated", "--overlong-buffer", "2",
          "--num-minibatches", "4", "--micro-batch-size", "2", "--update-epochs", "2"], True),
    ],
)
def test_dynamic_sampling_trains_on_at_most_num_prompts_groups(args, fewer, tmp_path):
    result = run("dapo.py", "--num-steps", "2", "--eval-every", "0", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [(int(n), float(loss), int(b), int(k)) for n, loss, b, k in STEP_LINE.findall(result.stdout)]
    assert [s[0] for s in steps] == [1, 2], result.stdout[-2000:]
    max_gen_batches = 1 if fewer else 10
    for step, loss, batches, kept in steps:
        assert torch.isfinite(torch.tensor(loss))
        assert 1 <= batches <= max_gen_batches and 1 <= kept <= 16
        assert kept == 16 or batches == max_gen_batches  # stops early only when 16 groups survived
        short = f"step {step}: only {kept} of 16 groups had unequal rewards in {batches} generation batches"
        assert (short in result.stdout) == (kept < 16)
    if fewer:
        assert all(kept < 16 for *_, kept in steps)
    else:
        assert any(batches > 1 for _, _, batches, _ in steps)  # several rounds were concatenated


def test_no_surviving_group_skips_the_update(tmp_path):
    # jsonl rows whose answer needs "<answer>never</answer>", 22 characters, so 22 tokens of the character tokenizer:
    # 16 new tokens can never write it, so every reward is 0, every group is dropped, and each step skips its update
    # after 2 rounds x 2 prompts = 4 groups
    rows = [{"prompt": f"{a}+1=", "answer": "never"} for a in range(3)]  # 1 row held out, 2 trained on
    data = write(tmp_path / "never.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    result = run(
        "dapo.py", "--task", f"jsonl:{data}", "--num-steps", "2", "--num-prompts", "2", "--group-size", "2",
        "--max-gen-batches", "2", "--eval-every", "1", "--save-dir", str(tmp_path / "ckpt"), "--save-every", "1",
        "--max-new-tokens", "16", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for step in (1, 2):
        assert f"step {step}: all 4 groups of 2 generation batches had equal rewards; update skipped" in result.stdout
    assert "step 1: held-out greedy accuracy" in result.stdout  # the skipped step still evaluates and saves
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(common.TINY_MODEL)
    for step in (1, 2):
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / f"step_{step}")
        assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), initial.parameters()))
