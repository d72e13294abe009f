"""Runs that survive: kill and resume, the guard against non-finite steps, determinism, checkpoint errors."""

import importlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file

import common
import tasks
from test_scripts import ENV, SCRIPTS, SMALL, check_bad_input, command, run


def module(script):
    return importlib.import_module(script.removesuffix(".py"))


def metrics(save_dir):
    """The logged metrics by step, without the timings (they differ from run to run)."""
    rows = [json.loads(line) for line in (save_dir / common.METRICS_FILE).read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows}


def weights(checkpoint):
    """Every saved tensor of a checkpoint (the policy, and the critic of ppo.py), by file and name."""
    return {
        f"{path.relative_to(checkpoint)}:{name}": tensor
        for path in sorted(checkpoint.rglob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_and_resume_equals_an_unbroken_run(script, tmp_path, capsys):
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    want = train(script, unbroken, num_steps=6, save_every=3)

    # the same run from the command line (long, so it cannot end first), killed with SIGKILL as soon as its step-3
    # checkpoint exists: the checkpoint is renamed into place complete, so its folder existing means it is whole
    process = subprocess.Popen(
        command(script, "--num-steps", "100", "--save-dir", str(killed), "--eval-every", "0", "--save-every", "3",
                *SMALL),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )
    deadline = time.time() + 300
    while not (killed / "step_3").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before its step-3 checkpoint"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "step_6").exists()  # killed well before the end

    # resumed for 3 more steps: same logged rewards and losses, same weights, as the unbroken run
    capsys.readouterr()
    got = train(script, killed, num_steps=6, save_every=3, resume=str(killed / "step_3"))
    assert "resumed from" in capsys.readouterr().out
    # step 0 is the start's evaluation; the rows logged after step 3 before the kill are gone
    assert sorted(got) == sorted(want) == [0, 1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step].get("reward/mean") == want[step].get("reward/mean"), step  # step 0: the start's evaluation
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    assert_same_weights(killed / "step_6", unbroken / "step_6")


def train(script, save_dir, **fields):
    """A short in-process run of `script` with the embedded default (the flags of SMALL), logging to `save_dir`."""
    fields = {"num_steps": 3, "eval_every": 0, "save_dir": str(save_dir), "num_prompts": 4, "max_new_tokens": 8,
              **fields}
    module(script).main(module(script).Args(**fields))
    return metrics(save_dir)


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_same_run(script, tmp_path):
    first, second = train(script, tmp_path / "first"), train(script, tmp_path / "second")
    assert first == second
    assert len({first[step]["reward/mean"] for step in (1, 2, 3)}) > 1 or first[1]["loss/policy"] != 0  # not empty
    assert_same_weights(tmp_path / "first" / "step_3", tmp_path / "second" / "step_3")


def poison_rewards(monkeypatch, calls):
    """Make tasks.score return NaN for every completion of the given training calls (0-based), as a broken
    reward function would. Evaluation (tasks.evaluate runs under no_grad) keeps the true score."""
    score, count = tasks.score, [0]

    def nan_score(*args):
        rewards = score(*args)
        if torch.is_grad_enabled():
            if count[0] in calls:
                rewards = torch.full_like(rewards, float("nan"))
            count[0] += 1
        return rewards

    monkeypatch.setattr(tasks, "score", nan_score)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_nan_reward_skips_the_update_and_the_run_goes_on(script, tmp_path, monkeypatch):
    poison_rewards(monkeypatch, calls={0})  # the first batch of step 1
    logged = train(script, tmp_path, save_every=1, keep_last=0)
    args = module(script).resolve_args(module(script).Args())
    updates = args.update_epochs * args.num_minibatches  # optimizer steps per step: all of step 1's are skipped
    assert [logged[s]["optim/skipped_steps"] for s in (1, 2, 3)] == [updates, updates, updates]
    # no optimizer step in step 1: its checkpoint holds the initial weights; steps 2-3 trained and stayed finite
    initial = {name: t for name, t in load_file(common.TINY_MODEL / "model.safetensors").items()}
    step_1 = {name.split(":")[1]: t for name, t in weights(tmp_path / "step_1").items() if name.startswith("model")}
    assert step_1.keys() == initial.keys() and all(torch.equal(step_1[k], initial[k]) for k in initial)
    step_3 = weights(tmp_path / "step_3")
    assert all(t.isfinite().all() for t in step_3.values())
    assert any(not torch.equal(step_3[f"model.safetensors:{k}"], initial[k]) for k in initial)


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_steps_in_a_row_stop_the_run(script, tmp_path, monkeypatch):
    poison_rewards(monkeypatch, calls=set(range(1000)))
    with pytest.raises(common.UserError, match=r"stopping at step 3: 3 steps in a row .* \(--max-skipped 3\)"):
        train(script, tmp_path, num_steps=5, save_every=1)
    assert sorted(metrics(tmp_path)) == [0, 1, 2, 3]
    assert [p.name for p in common.checkpoints(tmp_path)] == ["step_1", "step_2"]  # step 3 stopped before saving


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_update_starts_from_zero_gradients_and_is_clipped_before_its_step(script, tmp_path, monkeypatch):
    # two minibatches per pass and --max-grad-norm 1e-3, far below the gradients' norms: every accumulate_gradients
    # call must find no gradient left from the previous update, and every AdamW step (ppo.py's critic's too) must
    # see gradients already clipped: a total norm of at most 1e-3, and about 1e-3 where the clip acted
    mod, bound, norms = module(script), 1e-3, []
    accumulate, step = mod.accumulate_gradients, torch.optim.AdamW.step

    def accumulate_from_zero(*args, **kwargs):
        for model in [a for a in args if isinstance(a, torch.nn.Module)]:
            assert all(p.grad is None for p in model.parameters())
        return accumulate(*args, **kwargs)

    def recorded_step(self, *args, **kwargs):
        grads = [p.grad.flatten() for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.cat(grads).norm().item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(mod, "accumulate_gradients", accumulate_from_zero)
    monkeypatch.setattr(torch.optim.AdamW, "step", recorded_step)
    train(script, tmp_path, num_steps=2, num_minibatches=2, max_grad_norm=bound)
    assert norms and max(norms) <= bound * (1 + 1e-4)
    assert max(norms) >= bound * 0.99


def test_each_epoch_reshuffles_the_rollout_batch(tmp_path, monkeypatch):
    # grpo.py, 2 steps x 2 epochs: 4 draws of a minibatch order, each a permutation of the 64 rows (4 prompts x 16)
    orders, randperm = [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: orders.append(randperm(*a, **k)) or orders[-1])
    train("grpo.py", tmp_path, num_steps=2, update_epochs=2, num_minibatches=2)
    assert len(orders) == 4 and all(sorted(order.tolist()) == list(range(64)) for order in orders)


def test_ppo_trains_its_critic_at_the_critics_learning_rate(tmp_path):
    # the critic's score head starts at zero (common.load_critic) and has moved after one step; each optimizer
    # state holds its own model's learning rate (ppo.py's tiny preset: policy 5e-4, critic 1e-3)
    train("ppo.py", tmp_path, num_steps=1, save_every=1)
    assert load_file(tmp_path / "step_1" / "critic" / "model.safetensors")["score.weight"].abs().max() > 0
    state = torch.load(tmp_path / "step_1" / common.TRAINING_STATE, weights_only=True)
    assert state["optimizers"]["critic"]["param_groups"][0]["lr"] == 1e-3
    assert state["optimizers"]["policy"]["param_groups"][0]["lr"] == 5e-4


def test_old_logprobs_come_from_the_policy_and_reference_ones_from_the_frozen_copy(tmp_path, monkeypatch):
    # grpo.py with two epochs (so the old log-prob pass runs) and beta > 0 (so the reference pass runs): each step
    # takes its old log-probs from the model it trains, then its reference log-probs from another model, which
    # still holds the initial weights at the end
    import grpo

    passes, trained = [], []
    rollout_logprobs, accumulate = common.rollout_logprobs, grpo.accumulate_gradients
    monkeypatch.setattr(common, "rollout_logprobs", lambda m, *a, **k: passes.append(m) or rollout_logprobs(m, *a, **k))
    monkeypatch.setattr(grpo, "accumulate_gradients", lambda m, *a, **k: trained.append(m) or accumulate(m, *a, **k))
    train("grpo.py", tmp_path, num_steps=2, update_epochs=2, beta=0.04)
    policy = trained[0]
    assert all(m is policy for m in trained)
    assert [m is policy for m in passes] == [True, False, True, False]  # per step: old, then reference
    reference = passes[1].state_dict()
    initial = load_file(common.TINY_MODEL / "model.safetensors")
    assert all(torch.equal(reference[name], tensor) for name, tensor in initial.items())


def test_evaluation_runs_at_step_0_and_every_eval_every_steps(tmp_path):
    logged = train("grpo.py", tmp_path, num_steps=4, eval_every=2)
    assert [step for step in sorted(logged) if "eval/accuracy" in logged[step]] == [0, 2, 4]


def test_dapo_trains_on_task_reward_plus_overlong_penalty_and_masks_truncated_rows(tmp_path, monkeypatch):
    # --max-new-tokens 8 with --overlong-buffer 8: the penalty starts at 0 tokens, so a completion of L tokens
    # (1..8) gets (0 - L)/8 = -L/8 added to its +-1: every reward the advantages see is +-1 - L/8, never +-1 itself.
    # Each reward belongs to its own row after the groups are kept and cut: reward + L/8 = +-1 with that row's L.
    # With --mask-truncated the completions that hit the limit leave the loss: a mask of zeros, the others whole
    import dapo

    seen, truncated_seen, advantages, accumulate = [], [], dapo.compute_advantages, dapo.accumulate_gradients

    def recorded_advantages(rewards, *args):
        seen.append(rewards)
        return advantages(rewards, *args)

    def masked_rows(model, rollout, *args):
        mask, truncated = rollout.completion_mask, rollout.truncated
        torch.testing.assert_close((seen[-1] + rollout.lengths / 8).abs(), torch.ones(len(truncated)))
        assert torch.equal(mask.sum(1) == 0, truncated) and not truncated.all()
        assert torch.equal(mask.sum(1)[~truncated], rollout.lengths[~truncated].to(mask.dtype))
        truncated_seen.append(truncated.any())
        return accumulate(model, rollout, *args)

    monkeypatch.setattr(dapo, "compute_advantages", recorded_advantages)
    monkeypatch.setattr(dapo, "accumulate_gradients", masked_rows)
    train("dapo.py", tmp_path, num_steps=2, overlong_buffer=8, mask_truncated=True)
    allowed = torch.tensor([sign - length / 8 for sign in (1, -1) for length in range(1, 9)])
    rewards = torch.cat(seen)
    assert len(rewards) and (rewards[:, None] - allowed).abs().min(dim=1).values.max() < 1e-6
    assert any(truncated_seen)  # some row to mask was there


def test_skipped_steps_apart_do_not_stop_the_run_and_their_count_survives_a_resume(tmp_path, monkeypatch):
    # steps 1 and 3 poisoned, --max-skipped 2: never 2 in a row, so the run ends, having skipped 1, 1, 2, 2 updates
    # in all after steps 1-4; then a run resumed from step 1's checkpoint (its one skipped update) goes on counting
    poison_rewards(monkeypatch, calls={0, 2})
    logged = train("grpo.py", tmp_path / "apart", num_steps=4, max_skipped=2, save_every=1, keep_last=0)
    assert [logged[s]["optim/skipped_steps"] for s in (1, 2, 3, 4)] == [1, 1, 2, 2]
    monkeypatch.undo()
    resumed = train("grpo.py", tmp_path / "resumed", num_steps=2, resume=str(tmp_path / "apart" / "step_1"))
    assert resumed[2]["optim/skipped_steps"] == 1


def test_skipped_steps_in_a_row_are_counted_across_a_resume(tmp_path, monkeypatch):
    # --max-skipped 2: step 3 poisoned and saved (1 in a row), then the resumed run's step 4 poisoned too: 2 in a row,
    # the run stops at step 4, as the unbroken run would
    poison_rewards(monkeypatch, calls={2})
    train("grpo.py", tmp_path, num_steps=3, max_skipped=2, save_every=3)
    monkeypatch.undo()
    poison_rewards(monkeypatch, calls={0})
    with pytest.raises(common.UserError, match=r"stopping at step 4: 2 steps in a row"):
        train("grpo.py", tmp_path, num_steps=6, max_skipped=2, save_every=3, resume=str(tmp_path / "step_3"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_resumed_run_keeps_its_start_evaluation(script, tmp_path, monkeypatch, capsys):
    # the held-out evaluation of step 0 is saved with each checkpoint: a run resumed at step 2 evaluates only at its
    # end (step 3), not its start again, and its last line reports the run's real start, step 0's accuracy
    train(script, tmp_path, num_steps=2, save_every=2)
    start = metrics(tmp_path)[0]["eval/accuracy"]
    evaluations, evaluate = [], tasks.evaluate
    monkeypatch.setattr(tasks, "evaluate", lambda *a, **k: evaluations.append(1) or evaluate(*a, **k))
    capsys.readouterr()
    logged = train(script, tmp_path, num_steps=3, resume=str(tmp_path / "step_2"))
    assert len(evaluations) == 1 and "eval/accuracy" in logged[3]
    end = logged[3]["eval/accuracy"]
    assert f"held-out greedy accuracy: start {start:.3f} -> end {end:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["grpo.py", "ppo.py"])
@pytest.mark.parametrize("saved, resumed", [("fp32", "bf16"), ("bf16", "fp32")])
def test_a_run_resumes_in_the_other_precision_with_every_weight_and_optimizer_state(script, saved, resumed, tmp_path):
    # saved by one process in fp32 (a plain model) or bf16 (FSDP2), loaded in the other: each weight and each AdamW
    # step count and moment is the saved one, exactly
    train(script, tmp_path, num_steps=1, save_every=1, precision=saved)
    args = module(script).resolve_args(module(script).Args(precision=resumed))
    dtype, cpu = torch.bfloat16 if resumed == "bf16" else torch.float32, torch.device("cpu")
    models = {"policy": common.load_model("tiny", cpu, dtype)}
    if script == "ppo.py":
        models["critic"] = common.load_critic("tiny", cpu, dtype)
    lr = {"policy": args.learning_rate, "critic": getattr(args, "critic_learning_rate", None)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=lr[name], weight_decay=args.weight_decay)
                  for name, model in models.items()}
    prompts = tasks.PromptStream(tasks.load_task(args.task).train, 0)
    common.load_training_state(str(tmp_path / "step_1"), script, models, optimizers, prompts)
    saved_weights = weights(tmp_path / "step_1")
    saved_states = torch.load(tmp_path / "step_1" / common.TRAINING_STATE, weights_only=True)["optimizers"]
    for name, model in models.items():
        folder = "" if name == "policy" else f"{name}/"
        for key, parameter in model.named_parameters():
            torch.testing.assert_close(common._local(parameter), saved_weights[f"{folder}model.safetensors:{key}"],
                                       rtol=0, atol=0)
            state = optimizers[name].state[parameter]
            assert state.keys() == saved_states[name]["state"][key].keys() == {"step", "exp_avg", "exp_avg_sq"}
            for what, value in state.items():
                torch.testing.assert_close(common._local(value), saved_states[name]["state"][key][what], rtol=0,
                                           atol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_save_before_the_first_update_changes_nothing(precision, tmp_path, monkeypatch):
    # step 1's update is skipped (NaN rewards), so the save after it finds no optimizer state yet: the run that saves
    # every step ends with the weights of the one that saves only at the end (torch's way of getting a fresh
    # optimizer's states takes an AdamW step at lr 0, which made the next update's bias correction another)
    poison_rewards(monkeypatch, calls=[0])
    train("grpo.py", tmp_path / "every", num_steps=3, save_every=1, keep_last=0, precision=precision)
    poison_rewards(monkeypatch, calls=[0])
    train("grpo.py", tmp_path / "end", num_steps=3, save_every=3, precision=precision)
    assert_same_weights(tmp_path / "every" / "step_3", tmp_path / "end" / "step_3")
    monkeypatch.undo()  # and resumed from that save, the run goes on as if unbroken
    (tmp_path / "resumed").mkdir()
    (tmp_path / "every" / "step_1").rename(tmp_path / "resumed" / "step_1")
    train("grpo.py", tmp_path / "resumed", num_steps=3, save_every=3, precision=precision,
          resume=str(tmp_path / "resumed" / "step_1"))
    assert_same_weights(tmp_path / "resumed" / "step_3", tmp_path / "end" / "step_3")


def test_a_checkpoint_of_another_model_is_a_user_error(tmp_path):
    # a Qwen2 model with the tiny model's shapes has q, k and v biases besides: from_pretrained would drop them
    # without an error, and the optimizer states with them
    from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id")
    tiny = AutoConfig.from_pretrained(common.TINY_MODEL).to_dict()
    Qwen2ForCausalLM(Qwen2Config(**{k: tiny[k] for k in keep})).save_pretrained(tmp_path / "qwen2")
    AutoTokenizer.from_pretrained(common.TINY_MODEL).save_pretrained(tmp_path / "qwen2")
    train("grpo.py", tmp_path / "run", num_steps=1, save_every=1, model=str(tmp_path / "qwen2"), preset="tiny")
    with pytest.raises(common.UserError, match="its policy has other weights than --model"):
        train("grpo.py", tmp_path / "run", num_steps=2, resume=str(tmp_path / "run" / "step_1"))


def older_format(state):  # as a plain model's were saved before: keyed by parameter index, not name
    for optimizer in state["optimizers"].values():
        names = list(optimizer["state"])
        optimizer["state"] = {names.index(name): value for name, value in optimizer["state"].items()}


@pytest.mark.parametrize("older", [lambda state: state["extra"].pop("start_eval"), older_format])
def test_a_checkpoint_of_an_older_version_is_a_user_error(older, tmp_path):
    train("grpo.py", tmp_path, num_steps=1, save_every=1)
    state = torch.load(tmp_path / "step_1" / common.TRAINING_STATE, weights_only=True)
    older(state)  # no start evaluation, or optimizer states keyed by parameter index
    torch.save(state, tmp_path / "step_1" / common.TRAINING_STATE)
    with pytest.raises(common.UserError, match="written by an older version of grpo.py"):
        train("grpo.py", tmp_path, num_steps=2, resume=str(tmp_path / "step_1"))


def test_dapo_trains_on_the_whole_groups_that_survive_its_filter(tmp_path, monkeypatch):
    # every generation round's task rewards are recorded; the rewards the advantages see must be, in order, the
    # groups of G rows whose rewards are not all equal, over the step's rounds, at most --num-prompts (4) of them
    # (--overlong-buffer 0: no penalty below --max-new-tokens, so the rewards are the task's)
    import dapo

    rounds, checked = [], []
    score, advantages, log_metrics = tasks.score, dapo.compute_advantages, common.log_metrics

    def recorded_score(*args):
        rounds.append(score(*args))
        return rounds[-1]

    def checked_advantages(rewards, group_size, eps):
        groups = torch.cat(rounds).view(-1, group_size)
        survivors = groups[(groups != groups[:, :1]).any(dim=1)][:4]
        assert torch.equal(rewards, survivors.flatten())
        checked.append(len(survivors))
        return advantages(rewards, group_size, eps)

    def end_of_step(*args, **kwargs):
        rounds.clear()
        return log_metrics(*args, **kwargs)

    monkeypatch.setattr(tasks, "score", recorded_score)
    monkeypatch.setattr(dapo, "compute_advantages", checked_advantages)
    monkeypatch.setattr(common, "log_metrics", end_of_step)
    train("dapo.py", tmp_path, num_steps=3, overlong_buffer=0)
    assert checked


def test_gfpo_adaptive_k_trains_the_rows_it_keeps_and_its_history_survives_a_resume(tmp_path, monkeypatch):
    # 4 prompts a step and a warm-up of 4 x 4 = 16 difficulties: steps 1-3 keep k = 8, from step 4 (16 in the
    # history) k is 8, 6 or 4 per prompt. Each step trains on exactly the rows kept, 4 x gfpo/retained_k of them;
    # a run resumed at step 3 must read the 12 difficulties back, or its step 4 would still keep k = 8
    flags = dict(adaptive_k=True, num_minibatches=2, micro_batch_size=4)
    rows, completion_logprobs, log_metrics = [0], common.completion_logprobs, common.log_metrics

    def counted(model, rollout, *args, **kwargs):
        rows[-1] += len(rollout.lengths) if torch.is_grad_enabled() else 0
        return completion_logprobs(model, rollout, *args, **kwargs)

    def next_step(save_dir, step, logged, *args):
        rows.append(0)
        return log_metrics(save_dir, step, logged, *args)

    monkeypatch.setattr(common, "completion_logprobs", counted)
    monkeypatch.setattr(common, "log_metrics", next_step)
    want = train("gfpo.py", tmp_path / "unbroken", num_steps=6, save_every=3, **flags)
    assert rows[1:7] == [round(4 * want[step]["gfpo/retained_k"]) for step in range(1, 7)]
    assert [want[step]["gfpo/retained_k"] for step in (1, 2, 3)] == [8, 8, 8]
    assert any(want[step]["gfpo/retained_k"] != 8 for step in (4, 5, 6))  # else the resume below proves nothing
    monkeypatch.undo()
    train("gfpo.py", tmp_path / "resumed", num_steps=3, save_every=3, **flags)
    got = train("gfpo.py", tmp_path / "resumed", num_steps=6, save_every=3, resume=str(tmp_path / "resumed" / "step_3"),
                **flags)
    for step in range(4, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_non_finite_weights_are_never_saved(tiny, tmp_path):
    model, tokenizer, _ = tiny
    broken = common.load_model("tiny", torch.device("cpu"))
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("inf")
    optimizer = torch.optim.AdamW(broken.parameters())
    prompts = tasks.PromptStream([{"prompt": "1+1=", "answer": 2}], 0)
    with pytest.raises(common.UserError, match="not saving step 7: the weights hold NaN or inf"):
        common.save_training_state(
            tmp_path, 7, "grpo.py", tokenizer, {"policy": broken}, {"policy": optimizer}, prompts
        )
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_is_flushed_to_disk_before_it_is_renamed_into_place(tiny, tmp_path, monkeypatch):
    # every file and folder of step_7.tmp is fsynced before the rename that makes it step_7, and the save folder
    # right after it (the rename itself): a crash of the machine cannot leave a step_7 whose files are still empty
    model, tokenizer, _ = tiny
    events, fsync, rename = [], os.fsync, Path.rename

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))  # the path the descriptor was opened on
        fsync(fd)

    def recorded_rename(self, target):
        events.append(("rename", str(self)))
        return rename(self, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(Path, "rename", recorded_rename)
    save_dir = Path(os.path.realpath(tmp_path))
    (save_dir / common.METRICS_FILE).write_text('{"step": 7}\n')  # the rows logged so far go to disk with it
    prompts = tasks.PromptStream([{"prompt": "1+1=", "answer": 2}], 0)
    path = common.save_training_state(save_dir, 7, "grpo.py", tokenizer, {"policy": model},
                                      {"policy": torch.optim.AdamW(model.parameters())}, prompts)
    tmp = str(save_dir / "step_7.tmp")
    files = [tmp + str(p)[len(str(path)):] for p in path.rglob("*")]
    renamed = events.index(("rename", tmp))
    flushed = [p for _, p in events[:renamed]]
    assert len(files) > 3 and sorted(flushed) == sorted(files + [tmp, str(save_dir / common.METRICS_FILE)])
    assert flushed.index(tmp) > max(map(flushed.index, files))  # the folder after the files it lists
    assert events[renamed + 1 :] == [("fsync", str(save_dir))]


def test_a_run_that_died_before_its_first_checkpoint_leaves_a_folder_to_remove(tmp_path):
    (tmp_path / common.METRICS_FILE).write_text('{"step": 0}\n')  # nothing to resume: appending would mix two runs
    with pytest.raises(common.UserError, match=re.escape(f"--save-dir {tmp_path}: holds the metrics.jsonl of a run"
                                                         " with no checkpoint to continue; remove it")):
        train("grpo.py", tmp_path)


def test_keep_last_and_a_save_that_dies_halfway(tmp_path, monkeypatch):
    train("grpo.py", tmp_path / "all", num_steps=4, save_every=1, keep_last=0)
    assert [p.name for p in common.checkpoints(tmp_path / "all")] == ["step_1", "step_2", "step_3", "step_4"]
    train("grpo.py", tmp_path / "two", num_steps=4, save_every=1, keep_last=2)
    assert [p.name for p in common.checkpoints(tmp_path / "two")] == ["step_3", "step_4"]

    # a save that dies after the weights, before the training state: step_2 is left as it was, the temporary
    # folder is no checkpoint, and --resume of the folder takes step_2
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        train("grpo.py", tmp_path / "two", num_steps=5, resume=str(tmp_path / "two"), save_every=1, keep_last=2)
    assert (tmp_path / "two" / "step_5.tmp").is_dir()
    assert common.find_checkpoint(str(tmp_path / "two")).name == "step_4"

    # a full disk at the same point is one line; the half-written folder is removed, step_3 and step_4 stay
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(common.UserError, match=re.escape(
            f"cannot save step 5 in {tmp_path / 'two'} ([Errno 28] No space left on device); the checkpoints saved")):
        train("grpo.py", tmp_path / "two", num_steps=5, resume=str(tmp_path / "two"), save_every=1, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "two").glob("step_*")) == ["step_3", "step_4"]

    # the same while the weights are written, which safetensors reports as its own error, not an OSError
    def weights_disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.undo()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", weights_disk_full)
    with pytest.raises(common.UserError, match=re.escape(f"cannot save step 5 in {tmp_path / 'two'} (Error while"
                                                         " serializing: I/O error: No space left on device")):
        train("grpo.py", tmp_path / "two", num_steps=5, resume=str(tmp_path / "two"), save_every=1, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "two").glob("step_*")) == ["step_3", "step_4"]

    # a half-written folder of another step (a kill during an earlier save) goes with the next save, not only when
    # that step is saved again
    monkeypatch.undo()
    (tmp_path / "two" / "step_9.tmp").mkdir()
    (tmp_path / "two" / "step_9.tmp" / "model.safetensors").write_bytes(b"cut short")
    train("grpo.py", tmp_path / "two", num_steps=5, resume=str(tmp_path / "two"), save_every=1, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "two").glob("step_*")) == ["step_4", "step_5"]


@pytest.fixture(scope="module")
def grpo_checkpoint(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("grpo_run")
    train("grpo.py", save_dir, num_steps=1)
    return save_dir / "step_1"


def corrupt_checkpoint(tmp_path, grpo_checkpoint):
    import shutil

    broken = tmp_path / "step_1"
    shutil.copytree(grpo_checkpoint, broken)
    (broken / common.TRAINING_STATE).write_bytes(b"not a checkpoint")
    return str(broken)


def truncated_weights(tmp_path, grpo_checkpoint):
    import shutil

    broken = tmp_path / "step_1"
    shutil.copytree(grpo_checkpoint, broken)
    weights_file = broken / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # a copy cut short
    return str(broken)


@pytest.mark.parametrize(
    "resume,script,names",
    [
        (lambda tmp, ckpt: "/no/such/checkpoint", "grpo.py", "--resume /no/such/checkpoint: no such folder"),
        (lambda tmp, ckpt: str(tmp), "grpo.py", "not a checkpoint"),  # an empty folder
        (corrupt_checkpoint, "grpo.py", "cannot read training_state.pt"),
        (lambda tmp, ckpt: str(ckpt), "gspo.py", "a checkpoint of grpo.py, not of gspo.py"),
        (lambda tmp, ckpt: str(ckpt), "ppo.py", "a checkpoint of grpo.py, not of ppo.py"),
    ],
)
def test_bad_checkpoints_are_user_errors(resume, script, names, tmp_path, grpo_checkpoint):
    check_bad_input(script, ["--resume", resume(tmp_path, grpo_checkpoint)], names, tmp_path)


def test_truncated_weights_are_a_user_error(tmp_path, grpo_checkpoint):
    with pytest.raises(common.UserError, match="does not fit this model and these flags"):
        train("grpo.py", tmp_path, resume=truncated_weights(tmp_path, grpo_checkpoint), num_steps=2)


def test_resume_at_the_last_step_is_a_user_error(tmp_path, grpo_checkpoint):
    # check_bad_input runs 1 step, and the checkpoint is at step 1
    flags = ["--resume", str(grpo_checkpoint), "--save-dir", str(tmp_path)]
    check_bad_input("grpo.py", flags, "--num-steps 1", tmp_path)


def test_a_refused_resume_changes_nothing_and_a_cut_last_metrics_line_is_dropped(tmp_path, grpo_checkpoint):
    run_dir = tmp_path / "run"
    train("grpo.py", run_dir, num_steps=4, save_every=2, keep_last=0)  # step_2, step_4; metrics rows 0 to 4
    log = run_dir / common.METRICS_FILE
    logged = log.read_bytes()
    refused = [
        ({"resume": str(run_dir / "step_4"), "num_steps": 4}, "--num-steps 4: the checkpoint is already at step 4"),
        ({"resume": str(run_dir / "step_2"), "num_steps": 6}, "holds later checkpoints (step_4)"),  # another future
        ({"resume": str(run_dir), "num_steps": 6, "task": "countdown"}, "a task of 40000 training rows"),
        # the checkpoint's learning rate (the tiny preset's 5e-4) would silently win over the flag
        ({"resume": str(run_dir), "num_steps": 6, "learning_rate": 1e-3},
         f"--learning-rate 0.001: the run resumed from {run_dir / 'step_4'} was trained with 0.0005"),
        ({"num_steps": 6}, "holds another run's step_4; continue it with --resume"),  # a new run, not resuming
        # resuming another run's checkpoint into this folder would cut and append to its metrics and prune its steps
        ({"resume": str(grpo_checkpoint), "num_steps": 6}, "holds another run's step_4; continue it with --resume"),
    ]
    for fields, message in refused:
        with pytest.raises(common.UserError, match=re.escape(message)):
            train("grpo.py", run_dir, **fields)
        assert log.read_bytes() == logged and [p.name for p in common.checkpoints(run_dir)] == ["step_2", "step_4"]

    log.write_bytes(logged + b'{"step": 5, "reward/me')  # a kill while step 5's row was written
    assert sorted(train("grpo.py", run_dir, resume=str(run_dir), num_steps=5)) == [0, 1, 2, 3, 4, 5]
    log.write_bytes(b'{"step": 0}\nnot json\n' + logged)  # a bad line that is not the last
    with pytest.raises(common.UserError, match="metrics.jsonl line 2 is no metrics row"):
        train("grpo.py", run_dir, resume=str(run_dir), num_steps=6)


def test_a_bad_resume_path_is_one_line_and_exit_2(tmp_path):
    result = run("gfpo.py", "--resume", str(tmp_path / "nothing"))
    assert result.returncode == 2 and result.stderr.strip() == f"error: --resume {tmp_path / 'nothing'}: no such folder"
