"""What each training loop hands its math functions: the temperature, the retained set, GAE's coefficients, the
whitened advantages, the penalised score, the value loss's weight, a history free of NaN, when dynamic sampling
stops; and what the step's metrics describe. The math itself is tested on hand-computed cases in test_<script>.py;
these short in-process runs check that `main` wires it as the papers say."""

import pytest
import torch
from safetensors.torch import load_file

import common
import tasks
from test_resume import poison_rewards, train
from test_scripts import SCRIPTS


def training_scores(monkeypatch, scores):
    """Record in `scores` the rewards tasks.score gives the training rollouts (the held-out evaluation, which runs
    under no_grad at the start and the end, is left out)."""
    score = tasks.score
    monkeypatch.setattr(tasks, "score", lambda *a: (scores.append(score(*a)) or scores[-1]) if torch.is_grad_enabled()
                        else score(*a))


@pytest.mark.parametrize("script", SCRIPTS)
def test_log_probs_are_taken_at_the_sampling_temperature(script, tmp_path, monkeypatch):
    # --temperature 0.7 and 2 epochs (so the old log-prob pass runs; the reference one runs where there is a KL):
    # every sampling call and every log-prob pass, trained or not, must use 0.7, or the ratio and the KL compare
    # two different distributions
    temperatures, generate, completion_logprobs = [], common.generate, common.completion_logprobs

    def sampling(model, tokenizer, prompts, group_size, max_new_tokens, temperature, *args, greedy=False, **kwargs):
        if not greedy:  # the held-out evaluation decodes greedily
            temperatures.append(("generate", temperature))
        return generate(model, tokenizer, prompts, group_size, max_new_tokens, temperature, *args, greedy=greedy,
                        **kwargs)

    def logprobs(model, rollout, temperature, *args, **kwargs):
        temperatures.append(("train" if torch.is_grad_enabled() else "no grad", temperature))
        return completion_logprobs(model, rollout, temperature, *args, **kwargs)

    monkeypatch.setattr(common, "generate", sampling)
    monkeypatch.setattr(common, "completion_logprobs", logprobs)
    train(script, tmp_path, num_steps=1, temperature=0.7, update_epochs=2)
    assert {kind for kind, _ in temperatures} == {"generate", "train", "no grad"}
    assert all(t == 0.7 for _, t in temperatures), temperatures


def test_gfpo_normalises_advantages_over_the_retained_set(tmp_path, monkeypatch):
    # GFPO eq. 2: for each prompt, the k = 8 rows kept of its G = 16 get (r - mean_S) / (std_S + 1e-4) with S the
    # kept rows and std_S the population std; normalising over all 16 instead would shift and scale them
    import gfpo

    rewards, kept, trained = [], [], []
    select_retained, accumulate = gfpo.select_retained, gfpo.accumulate_gradients
    training_scores(monkeypatch, rewards)
    monkeypatch.setattr(gfpo, "select_retained", lambda *a: kept.append(select_retained(*a)) or kept[-1])
    # accumulate_gradients(model, rollout, old_logp, ref_logp, advantages, ...): one call a step (1 minibatch)
    monkeypatch.setattr(gfpo, "accumulate_gradients", lambda *a: trained.append(a[4]) or accumulate(*a))
    train("gfpo.py", tmp_path, num_steps=2)
    assert len(rewards) == len(kept) == len(trained) == 2
    for r, keep, advantages in zip(rewards, kept, trained):
        r_kept = r[keep].view(-1, 8)  # 4 prompts x 8 kept, in row order
        mean = r_kept.mean(dim=1, keepdim=True)
        std = ((r_kept - mean) ** 2).mean(dim=1, keepdim=True).sqrt()
        torch.testing.assert_close(advantages.view(-1, 8), (r_kept - mean) / (std + 1e-4))
    assert any(a.abs().sum() > 0 for a in trained)  # else every retained set was uniform and this proves nothing


def test_ppo_wires_gae_whitening_and_the_missing_eos_penalty(tmp_path, monkeypatch):
    # gamma 0.9 and lambda 0.8 (unequal, so a swap shows); --missing-eos-penalty 1: a completion cut at the 8-token
    # budget scores its task reward minus 1; the advantages trained on are GAE's whitened over the batch's valid
    # tokens: mean 0 and unbiased variance 1 (up to the 1e-8 under the square root)
    import ppo

    seen, rewards = {}, []
    compute_rewards, compute_advantages = ppo.compute_rewards, ppo.compute_advantages

    def recorded(name, fn):
        def call(*args, **kwargs):
            seen.setdefault(name, args)
            return fn(*args, **kwargs)
        return call

    training_scores(monkeypatch, rewards)
    monkeypatch.setattr(ppo, "compute_rewards", recorded("compute_rewards", compute_rewards))
    monkeypatch.setattr(ppo, "compute_advantages", recorded("compute_advantages", compute_advantages))
    monkeypatch.setattr(ppo, "accumulate_gradients", recorded("accumulate", ppo.accumulate_gradients))
    train("ppo.py", tmp_path, num_steps=1, gamma=0.9, lam=0.8, missing_eos_penalty=1.0)
    # accumulate_gradients(model, critic, rollout, old_logp, old_values, advantages, ...)
    rollout, advantages = seen["accumulate"][2], seen["accumulate"][5]
    assert len(rewards) == 1 and rollout.truncated.any() and not rollout.truncated.all()
    torch.testing.assert_close(seen["compute_rewards"][0], rewards[0] - rollout.truncated.float())
    assert seen["compute_advantages"][3:5] == (0.9, 0.8)  # (token_rewards, values, mask, gamma, lam)
    valid = advantages[rollout.completion_mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.var().item() == pytest.approx(1.0, abs=1e-4)


def test_ppo_value_loss_reaches_the_critic_through_vf_coef(tmp_path):
    # --vf-coef 0: the critic's loss is weighted 0, so its gradient is 0 and AdamW (weight decay 0) leaves it as it
    # was: its score head still all zeros (common.load_critic starts it there) and its backbone the policy's
    # initial weights. Dropping vf_coef from the total loss would move both
    train("ppo.py", tmp_path, num_steps=1, vf_coef=0.0, save_every=1)
    critic = load_file(tmp_path / "step_1" / "critic" / "model.safetensors")
    assert critic["score.weight"].abs().max() == 0
    initial = load_file(common.TINY_MODEL / "model.safetensors")
    backbone = {name.removeprefix("model."): t for name, t in initial.items() if name.startswith("model.")}
    assert backbone and all(torch.equal(critic[f"model.{name}"], t) for name, t in backbone.items())


def test_gfpo_adaptive_k_history_leaves_out_the_difficulty_of_a_nan_reward(tmp_path, monkeypatch):
    # step 1's rewards are all NaN (a broken reward function): their difficulties must stay out of the history,
    # else torch.quantile returns NaN and every later prompt falls in one bucket. Step 2 adds its 4 finite ones
    import gfpo

    poison_rewards(monkeypatch, calls={0})
    histories, adaptive_k = [], gfpo.adaptive_k
    monkeypatch.setattr(gfpo, "adaptive_k", lambda d, history, *a, **k: histories.append(history) or
                        adaptive_k(d, history, *a, **k))
    train("gfpo.py", tmp_path, num_steps=2, adaptive_k=True)
    assert [len(h) for h in histories] == [0, 4]
    assert histories[1].isfinite().all()


def test_dapo_stops_sampling_once_num_prompts_groups_survive(tmp_path, monkeypatch):
    # DAPO eq. 11 / Algorithm 1: generate prompt batches until 4 groups (--num-prompts) have unequal rewards, no
    # more: in every step, the rounds before the last one held fewer than 4 surviving groups
    rounds, per_step, log_metrics = [], [], common.log_metrics
    training_scores(monkeypatch, rounds)

    def end_of_step(*args, **kwargs):
        if rounds:
            survivors = [int((g != g[:, :1]).any(dim=1).sum()) for g in (r.view(-1, 16) for r in rounds)]
            per_step.append(survivors)
            rounds.clear()
        return log_metrics(*args, **kwargs)

    monkeypatch.setattr(common, "log_metrics", end_of_step)
    train("dapo.py", tmp_path, num_steps=3, overlong_buffer=0, max_gen_batches=10)
    assert len(per_step) == 3
    for survivors in per_step:
        assert sum(survivors[:-1]) < 4 and (sum(survivors) >= 4 or len(survivors) == 10), per_step
    assert any(len(survivors) > 1 for survivors in per_step)  # some step needed more than one round


@pytest.mark.parametrize("script", ["grpo.py", "gspo.py", "gfpo.py"])
def test_step_metrics_describe_the_rollout(script, tmp_path, monkeypatch):
    # one step of 8 prompts x 16 completions of up to 8 tokens: the logged reward, length, truncated share and share
    # of groups with equal rewards are those of the sampled rollout; the entropy is the mean over its valid tokens
    # (gfpo.py's is over the retained rows only: docs/gfpo.md), not over the padding past EOS
    rollouts, rewards, generate = [], [], common.generate
    monkeypatch.setattr(common, "generate", lambda *a, greedy=False, **k: generate(*a, greedy=greedy, **k) if greedy
                        else rollouts.append(generate(*a, **k)) or rollouts[-1])
    training_scores(monkeypatch, rewards)
    logged = train(script, tmp_path, num_steps=1, num_prompts=8)[1]
    (rollout,), (r,) = rollouts, rewards
    equal_groups = sum(len(set(group.tolist())) == 1 for group in r.view(8, 16))
    assert equal_groups != 4  # else counting the unequal groups instead would give the same share
    assert logged["reward/mean"] == pytest.approx(r.mean().item())
    assert logged["completion/mean_length"] == pytest.approx(rollout.lengths.float().mean().item())
    assert logged["completion/truncated_frac"] == pytest.approx(rollout.truncated.float().mean().item())
    assert logged["groups/zero_std_frac"] == pytest.approx(equal_groups / 8)
    assert 0 < rollout.truncated.float().mean() < 1  # some rows end early: their padding must not count below
    if script != "gfpo.py":
        valid = rollout.completion_mask.bool()
        assert logged["policy/entropy"] == pytest.approx(rollout.entropy[valid].mean().item(), rel=1e-5)
