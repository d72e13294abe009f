"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (ByteDance Seed, arXiv 2503.14476, eq. 8-13).

GRPO (grpo.py) with five changes, each its own block below: clip-higher (the ratio clipped to 1 - 0.2 .. 1 + 0.28,
section 3.1); a token-mean loss over the whole minibatch (eq. 8); no KL term and no reference model; dynamic
sampling, which drops groups whose rewards are all equal and generates more until --num-prompts groups survive
(eq. 11); and the soft overlong punishment added to the reward (eq. 13), with overlong filtering as a flag. Both
presets take several optimizer steps per rollout batch, so the clip is live. More in docs/dapo.md.
"""

import os
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import tyro
from tqdm import tqdm

import common
import tasks

SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: --resume refuses another script's


@dataclass
class Args:
    exp_name: str = "dapo"
    """name of this experiment (run name in Weights and Biases)"""
    seed: int = 1
    """seed of python and torch random number generators"""
    model: str = "tiny"
    """hub id or local folder of a causal LM; `tiny` is the model shipped in assets/"""
    task: common.FromPreset[str] = None
    """arithmetic, countdown, gsm8k, gsm8k:PATH (a jsonl file in GSM8K's format) or jsonl:PATH"""
    preset: Literal["auto", "tiny", "paper"] = "auto"
    """where unset defaults come from: `auto` picks `tiny` for the embedded model, `paper` otherwise"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N; `auto` is `cuda` when available, else `cpu`"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """compute dtype (`auto`: bf16 on CUDA, fp32 on the CPU); weights and optimizer states stay fp32"""
    attn_implementation: str = "sdpa"
    """attention kernel for from_pretrained: sdpa, eager, flash_attention_2, flash_attention_3 or flex_attention"""
    num_steps: common.FromPreset[int] = None
    """rollout batches to train on"""
    num_prompts: int = 16
    """prompts per rollout batch after dynamic sampling (groups with unequal rewards), over all processes"""
    group_size: int = 16
    """completions sampled per prompt (G)"""
    max_new_tokens: common.FromPreset[int] = None
    """maximum completion length"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    learning_rate: common.FromPreset[float] = None
    """AdamW learning rate"""
    clip_eps_low: float = 0.2
    """clipping range below: the ratio is clipped at 1 - eps_low"""
    clip_eps_high: float = 0.28
    """clipping range above (clip-higher, DAPO section 3.1): the ratio is clipped at 1 + eps_high"""
    overlong_buffer: Optional[int] = None
    """L_cache of the soft overlong punishment (DAPO eq. 13); default: --max-new-tokens // 5; 0 turns it off"""
    mask_truncated: bool = False
    """overlong filtering (DAPO section 3.4): completions that hit --max-new-tokens without EOS get no loss"""
    max_gen_batches: int = 10
    """dynamic sampling: at most this many prompt batches are generated per step to find --num-prompts groups"""
    adv_eps: float = 1e-4
    """added to the group std in the advantage denominator; positive, so a group of equal rewards gets 0, not 0/0"""
    update_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: common.FromPreset[int] = None
    """optimizer steps per pass (the rollout batch is shuffled and split)"""
    micro_batch_size: common.FromPreset[int] = None
    """rows per forward/backward on each process; the whole minibatch if the preset sets none"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    logprob_chunk_size: int = 256
    """completion tokens whose logits are computed at a time (a memory bound)"""
    eval_every: common.FromPreset[int] = None
    """evaluate greedy held-out accuracy every N steps; always at the start and the end"""
    eval_batch_size: Optional[int] = None
    """held-out prompts per greedy generation on each process (default: all at once)"""
    save_dir: Optional[str] = None
    """folder for metrics.jsonl and checkpoints (step_N: save_pretrained format, plus what --resume needs)"""
    save_every: int = 0
    """write a checkpoint every N steps (0: only at the end, when --save-dir is set)"""
    keep_last: int = 2
    """checkpoints kept in --save-dir, the newest (0: all)"""
    resume: Optional[str] = None
    """continue from a checkpoint folder, or from the newest checkpoint in a --save-dir (then the default --save-dir)"""
    max_skipped: int = 3
    """skip an update with a non-finite loss or gradient norm; stop after this many rollout batches in a row with one"""
    track: bool = False
    """log to Weights and Biases"""
    wandb_project: str = "rl-post-training"
    """Weights and Biases project"""
    wandb_entity: Optional[str] = None
    """Weights and Biases entity (team)"""


# Values for the fields left as None. `tiny`: the embedded model and task, a few minutes on a laptop CPU.
# `paper`: DAPO's settings (G 16, lr 1e-6, 16 optimizer steps per rollout batch) on GSM8K.
PRESETS = {
    "tiny": dict(task="arithmetic", num_steps=80, max_new_tokens=40, learning_rate=5e-4, num_minibatches=4,
                 eval_every=20),
    "paper": dict(task="gsm8k", num_steps=1000, max_new_tokens=512, learning_rate=1e-6, num_minibatches=16,
                  eval_every=50, micro_batch_size=8),
}


def resolve_args(args: Args) -> Args:
    preset = args.preset if args.preset != "auto" else ("tiny" if common.is_tiny(args.model) else "paper")
    for field, value in PRESETS[preset].items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    args.preset = preset
    if args.overlong_buffer is None:  # DAPO eq. 13's L_cache = L_max // 5: section 4.1's 4096 of 20480
        args.overlong_buffer = args.max_new_tokens // 5
    if args.resume and args.save_dir is None:  # keep saving where the resumed run saved
        args.save_dir = str(common.find_checkpoint(args.resume).parent)
    return args


def validate_args(args: Args, world_size: int = 1):
    """Every flag in range; under torchrun the batch is split over `world_size` processes."""
    common.check_flags(args, dict(
        num_steps=1, num_prompts=1, group_size=2, max_new_tokens=1, update_epochs=1, logprob_chunk_size=1,
        eval_batch_size=1, max_skipped=1, clip_eps_low=0, overlong_buffer=0, max_gen_batches=1,
        eval_every=0, save_every=0, keep_last=0,
    ), positive=("temperature", "learning_rate", "max_grad_norm", "adv_eps"))
    common.check(args.clip_eps_high >= args.clip_eps_low,
                 f"--clip-eps-high {args.clip_eps_high}: must be at least --clip-eps-low ({args.clip_eps_low})")
    common.check(args.overlong_buffer <= args.max_new_tokens,
                 f"--overlong-buffer {args.overlong_buffer}: must be at most --max-new-tokens ({args.max_new_tokens})")
    common.check_batches(args, args.group_size, "--group-size", world_size)
    common.check_save_dir(args)


def compute_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Group-relative advantage, DeepSeekMath section 4.1.2 (outcome supervision):
    A_i = (r_i - mean(group)) / (std(group) + eps), unbiased std, one value per completion, shape (B,)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased (N-1), as the reference implementations
    return ((grouped - mean) / (std + eps)).view(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """Soft overlong punishment, DAPO eq. 13, added to the task reward; shape (B,) like `lengths`.
    0 up to L_max - L_cache tokens, then falling linearly to -1 at L_max, and -1 beyond L_max."""
    expected = max_len - cache_len
    lengths = lengths.float()
    linear = (expected - lengths) / max(cache_len, 1)  # unused when cache_len is 0; max() keeps 0/0 out
    return torch.where(lengths <= expected, 0.0, torch.where(lengths <= max_len, linear, -1.0))


def filter_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dynamic sampling, DAPO eq. 11: True for each group whose rewards are not all equal (the groups kept), shape
    (B / group_size,). Pass the task rewards: eq. 11 keeps a group with some right and some wrong answers."""
    grouped = rewards.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def compute_policy_loss(logp, old_logp, advantages, mask, clip_eps_low: float, clip_eps_high: float, num_tokens):
    """DAPO objective, eq. 8, as a loss (clip-higher, token-mean, no KL); returns it and detached metrics, all divided
    by num_tokens, the minibatch's token count, so micro-batches add up. logp, old_logp, mask: (B, T); adv.: (B,)."""
    ratio = torch.exp((logp - old_logp) * mask)  # 1 past EOS, whatever the padding holds: exp() stays finite
    adv = advantages[:, None]
    # clip-higher (DAPO section 3.1): 1 - eps_low below, 1 + eps_high above
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * adv)
    # no KL term (DAPO section 2.3)
    per_token = -surrogate
    # token-mean: sum_{i,t} l[i, t] / sum_i |o_i|   (DAPO eq. 8), sum_i |o_i| counted over the whole minibatch
    loss = (per_token * mask).sum() / num_tokens

    with torch.no_grad():
        clipped = ((ratio > 1 + clip_eps_high) & (adv > 0)) | ((ratio < 1 - clip_eps_low) & (adv < 0))
        log_ratio = (logp - old_logp) * mask
        metrics = {
            "loss/policy": loss.detach(),
            "policy/clip_frac": (clipped.float() * mask).sum() / num_tokens,
            # k3 estimate of KL(pi_old || pi), r = pi / pi_old over tokens pi_old sampled
            "policy/approx_kl": ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum() / num_tokens,
        }
    return loss, metrics


def accumulate_gradients(model, rollout, old_logp, advantages, minibatch, micro_batch_size, args):
    """Backward pass over one minibatch (row indices), `micro_batch_size` rows at a time. The accumulated gradient
    is the whole minibatch's: every micro-batch divides by the minibatch's token count (DAPO's token-mean)."""
    metrics, tokens = {}, rollout.completion_mask[minibatch].sum()
    # the token-mean's denominator, averaged over the processes (FSDP averages gradients); at least 1, as
    # --mask-truncated can leave no token
    num_tokens = common.all_reduce(tokens, "mean").clamp(min=1)
    for rows in minibatch.split(micro_batch_size):
        micro = rollout.select(rows)  # cut to its own longest completion
        logp, _ = common.completion_logprobs(model, micro, args.temperature, chunk_size=args.logprob_chunk_size)
        T = logp.shape[1]
        # old_logp None: on-policy, the policy being updated is the one that sampled (ratio exactly 1)
        old_logp_micro = logp.detach() if old_logp is None else old_logp[rows, :T]
        loss, micro_metrics = compute_policy_loss(
            logp, old_logp_micro, advantages[rows], micro.completion_mask, args.clip_eps_low, args.clip_eps_high,
            num_tokens,
        )
        loss.backward()
        for k, v in micro_metrics.items():  # the minibatch's metrics: its loss; token means over all its tokens
            metrics[k] = metrics.get(k, 0) + v  # each micro-batch's already divides by the minibatch's tokens
    return metrics


def main(args: Args):
    args = resolve_args(args)
    validate_args(args, common.world_size())
    device = common.get_device(args.device)
    dtype = common.compute_dtype(args.precision, device)
    # torchrun: join the process group; every process samples its own share, only rank 0 prints and logs
    rank = common.init_distributed(device)
    common.seed_everything(args.seed + rank)
    track = args.track and rank == 0
    print("resolved arguments: " + ", ".join(f"{k}={v}" for k, v in asdict(args).items()))

    tokenizer = common.load_tokenizer(args.model)
    task = tasks.load_task(args.task)
    # fp32 weights; in bf16 or under torchrun FSDP2 shards them and computes in `dtype` (common.place)
    model = common.load_model(args.model, device, dtype, args.attn_implementation, args.gradient_checkpointing)
    eos_ids = common.eos_token_ids(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    prompts = tasks.PromptStream(task.train, args.seed)
    models, optimizers = {"policy": model}, {"policy": optimizer}  # what a checkpoint saves and --resume restores
    if track:
        import wandb
        wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.exp_name, config=asdict(args))

    def run_eval(step):
        accuracy, length, samples = tasks.evaluate(model, tokenizer, task, args.max_new_tokens, eos_ids,
                                                   args.eval_batch_size)
        tqdm.write(f"step {step}: held-out greedy accuracy {accuracy:.3f}  len {length:.1f} ({len(task.eval)} prompts)")
        if track:  # a few completions, to read
            wandb.log({"eval/samples": wandb.Table(["prompt", "completion", "reward"], samples[:8])}, step=step)
        return {"eval/accuracy": accuracy, "eval/mean_length": length}

    def save(step):
        extra = {"skipped_steps": skipped_steps, "skipped_in_a_row": skipped_in_a_row, "start_eval": start_eval}
        path = common.save_training_state(args.save_dir, step, SCRIPT, tokenizer, models, optimizers, prompts, extra,
                                          args.keep_last)
        tqdm.write(f"saved {path}")

    def end_step(step, logged):  # evaluation when due, metrics, the stop after non-finite steps, checkpoints
        if args.eval_every and step % args.eval_every == 0 or step == args.num_steps:
            logged.update(run_eval(step))
        common.log_metrics(args.save_dir, step, {**logged, "perf/elapsed": time.time() - start_time}, track)
        common.check(skipped_in_a_row < args.max_skipped,
                     f"stopping at step {step}: {skipped_in_a_row} steps in a row had a non-finite loss or gradient"
                     f" norm (--max-skipped {args.max_skipped}); the checkpoints saved before are intact")
        if args.save_dir and (args.save_every and step % args.save_every == 0 or step == args.num_steps):
            save(step)

    # resume: weights, optimizer states, the prompt stream's position and the RNG states (common.py)
    start_step, skipped_steps, skipped_in_a_row = 0, 0, 0
    if args.resume:
        start_step, extra = common.load_training_state(args.resume, SCRIPT, models, optimizers, prompts, args.save_dir,
                                                       args.num_steps)
        skipped_steps, skipped_in_a_row = extra["skipped_steps"], extra["skipped_in_a_row"]
    start_time = time.time()
    start_eval = extra["start_eval"] if args.resume else run_eval(0)  # a resumed run keeps its start's evaluation
    if not args.resume:
        common.log_metrics(args.save_dir, 0, {**start_eval, "perf/elapsed": 0.0}, track)
    num_prompts = args.num_prompts // common.world_size()  # this process's share of each rollout batch
    batch_size = num_prompts * args.group_size
    minibatch_size = batch_size // args.num_minibatches
    micro_batch_size = args.micro_batch_size or minibatch_size
    for step in tqdm(range(start_step + 1, args.num_steps + 1), initial=start_step, total=args.num_steps,
                     desc=args.exp_name):
        # 1. Rollout and scoring with dynamic sampling (DAPO eq. 11): G completions per prompt, contiguous; keep the
        # groups whose task rewards are not all equal, generating prompt batches until num_prompts groups survive or
        # max_gen_batches rounds ran, and cut the surplus. Under torchrun all go on until every process has its share
        t0 = time.time()
        kept, generated, gen_batches, num_groups, dropped_groups = [], [], 0, 0, 0
        while common.min_over_processes(num_groups, device) < num_prompts and gen_batches < args.max_gen_batches:
            gen_batches += 1
            rows = prompts.next(args.num_prompts)[rank * num_prompts : (rank + 1) * num_prompts]
            texts = [common.format_prompt(tokenizer, r["prompt"], task.use_chat_template) for r in rows]
            rollout = common.generate(model, tokenizer, texts, args.group_size, args.max_new_tokens, args.temperature,
                                      eos_ids)
            completions = common.decode_completions(tokenizer, rollout)
            task_rewards = tasks.score(task, completions, rows, args.group_size).to(device)
            # soft overlong punishment (DAPO eq. 13), added to the task reward
            penalty = overlong_penalty(rollout.lengths, args.max_new_tokens, args.overlong_buffer)
            survivors = filter_groups(task_rewards, args.group_size).nonzero().squeeze(1)
            dropped_groups += num_prompts - len(survivors)
            groups = survivors[: num_prompts - num_groups]
            keep = (groups[:, None] * args.group_size + torch.arange(args.group_size, device=device)).view(-1)
            if len(groups):
                kept.append((rollout.select(keep), (task_rewards + penalty)[keep]))
            generated.append((task_rewards + penalty, penalty, rollout.lengths, rollout.truncated))
            num_groups += len(groups)
        time_generate = time.time() - t0
        # torchrun: every process trains on as many groups as the one with the fewest (FSDP's passes must match)
        num_groups = common.min_over_processes(num_groups, device)
        all_rewards, all_penalty, all_lengths, all_truncated = (torch.cat(x) for x in zip(*generated))
        dynamic = {"dapo/gen_batches": gen_batches, "dapo/dropped_groups": dropped_groups,
                   "dapo/kept_groups": num_groups}
        if num_groups == 0:  # every group of every round had equal rewards: nothing to learn, no update
            tqdm.write(f"step {step}: all {dropped_groups} groups of {gen_batches} generation batches had equal"
                       " rewards; update skipped")
            logged = dict(dynamic)
            end_step(step, logged)
            continue
        if num_groups < num_prompts:  # fewer groups survived than asked for: train on those
            tqdm.write(f"step {step}: only {num_groups} of {num_prompts} groups had unequal rewards in"
                       f" {gen_batches} generation batches; training on them")
        rollout = common.Rollout.cat([r for r, _ in kept], tokenizer.pad_token_id)
        rollout = rollout.select(torch.arange(num_groups * args.group_size, device=device))
        rewards = torch.cat([r for _, r in kept])[: num_groups * args.group_size]
        batch_size = len(rewards)  # fewer than num_prompts groups when fewer survived

        # 2. Advantages
        t0 = time.time()
        advantages = compute_advantages(rewards, args.group_size, args.adv_eps)
        if args.mask_truncated:  # overlong filtering (DAPO section 3.4): truncated completions leave the loss
            rollout.completion_mask = rollout.completion_mask * ~rollout.truncated[:, None]
        mask = rollout.completion_mask

        # 3. Log-probs of the sampling policy (old), once per rollout batch; no reference model (DAPO section 2.3).
        # With one epoch and one minibatch the update's own log-probs, detached, are the old ones: that pass is skipped
        old_logp = None
        if args.update_epochs > 1 or args.num_minibatches > 1:
            old_logp = common.rollout_logprobs(model, rollout, args.temperature, micro_batch_size)

        # 4. update_epochs x num_minibatches optimizer steps over micro-batches; a non-finite one is skipped
        step_metrics, step_skipped = [], 0
        for epoch in range(args.update_epochs):
            order = torch.randperm(batch_size, device=device)
            for minibatch in order.split(minibatch_size):
                minibatch_metrics = accumulate_gradients(model, rollout, old_logp, advantages, minibatch,
                                                         micro_batch_size, args)
                step_metrics.append(minibatch_metrics)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if common.all_finite(grad_norm, minibatch_metrics["loss/policy"]):
                    optimizer.step()
                else:
                    step_skipped += 1
                optimizer.zero_grad(set_to_none=True)  # freed now: generation and evaluation do without them
        skipped_steps += step_skipped
        skipped_in_a_row = skipped_in_a_row + 1 if step_skipped else 0
        time_train = time.time() - t0

        # 5. Logging (one host sync per step), evaluation and checkpoints. DAPO: reward and completion statistics
        # over every completion generated in step 1, the dropped groups included; loss and policy statistics over
        # the groups trained on
        logged = {k: torch.stack([m[k] for m in step_metrics]).mean() for k in step_metrics[0]}
        logged.update({
            "reward/mean": all_rewards.mean(),
            "reward/std": all_rewards.std(),
            "completion/mean_length": all_lengths.float().mean(),
            "completion/truncated_frac": all_truncated.float().mean(),
            "policy/entropy": (rollout.entropy * mask).sum() / mask.sum().clamp(min=1),  # masking can leave none
            "optim/grad_norm": grad_norm,
            "groups/zero_std_frac": (all_rewards.view(-1, args.group_size).std(dim=1) == 0).float().mean(),
            "dapo/overlong_penalty": all_penalty.mean(),
        })
        logged = {k: float(v) for k, v in common.mean_over_processes(logged).items()}
        logged.update({
            "optim/lr": optimizer.param_groups[0]["lr"],
            "optim/skipped_steps": skipped_steps,
            "perf/tokens_per_sec": logged["completion/mean_length"] * len(all_lengths) / (time_generate + time_train),
            "perf/time_generate": time_generate,
            "perf/time_train": time_train,
            **dynamic,
        })
        tqdm.write(f"step {step}: reward {logged['reward/mean']:.3f}  loss {logged['loss/policy']:+.4f}"
                   f"  batches {gen_batches}  kept {num_groups}  len {logged['completion/mean_length']:.1f}"
                   f"  grad {logged['optim/grad_norm']:.3f}  {logged['perf/tokens_per_sec']:.0f} tok/s")
        if step_skipped:
            tqdm.write(f"step {step}: {step_skipped} optimizer step(s) skipped: non-finite loss or gradient norm")
        end_step(step, logged)

    print(f"held-out greedy accuracy: start {start_eval['eval/accuracy']:.3f} -> end {logged['eval/accuracy']:.3f}"
          f" ({time.time() - start_time:.0f}s)")
    if track:
        wandb.finish()
    common.finish_distributed()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except common.UserError as e:
        common.fail(str(e))
