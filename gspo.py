"""GSPO: Group Sequence Policy Optimization (Qwen, arXiv 2507.18071, eq. 5-7).

GRPO (grpo.py) with the importance ratio of a whole completion instead of one per token: s_i is the geometric
mean of the token ratios over the completion's valid tokens (eq. 7), clipped to a tiny asymmetric range
(3e-4 below, 4e-4 above, section 5.1), and the loss is -min(s_i A_i, clip(s_i) A_i), one term per completion,
averaged over the minibatch's completions (eq. 5); a clipped completion gives no gradient at all. No KL term and
no reference model. With a single on-policy update s_i = 1 and the gradient is GRPO's, so the default schedule
is off-policy: 4 minibatches per rollout batch, as in the paper. `policy/clip_frac` counts clipped completions.
The choices where papers and implementations differ are in docs/gspo.md.
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
    exp_name: str = "gspo"
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
    """prompts per rollout batch, over all processes under torchrun"""
    group_size: int = 16
    """completions sampled per prompt (G)"""
    max_new_tokens: common.FromPreset[int] = None
    """maximum completion length"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    learning_rate: common.FromPreset[float] = None
    """AdamW learning rate"""
    clip_eps_low: float = 3e-4
    """clip the sequence ratio below at 1 - clip_eps_low (GSPO section 5.1)"""
    clip_eps_high: float = 4e-4
    """clip the sequence ratio above at 1 + clip_eps_high (GSPO section 5.1)"""
    adv_eps: float = 1e-4
    """added to the group std in the advantage denominator; positive, so a group of equal rewards gets 0, not 0/0"""
    update_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: int = 4
    """optimizer steps per pass (the rollout batch is shuffled and split; GSPO section 5.1: 4)"""
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
# `paper`: lr 1e-6 as the other scripts (GSPO does not state it), no KL, on GSM8K.
# `tiny` trains at 2e-4, not the others' 5e-4, which diverges within a rollout batch of 4 minibatches (docs/gspo.md)
PRESETS = {
    "tiny": dict(task="arithmetic", num_steps=100, max_new_tokens=40, learning_rate=2e-4, eval_every=25),
    "paper": dict(task="gsm8k", num_steps=1000, max_new_tokens=512, learning_rate=1e-6, eval_every=50,
                  micro_batch_size=8),
}


def resolve_args(args: Args) -> Args:
    preset = args.preset if args.preset != "auto" else ("tiny" if common.is_tiny(args.model) else "paper")
    for field, value in PRESETS[preset].items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    args.preset = preset
    if args.resume and args.save_dir is None:  # keep saving where the resumed run saved
        args.save_dir = str(common.find_checkpoint(args.resume).parent)
    return args


def validate_args(args: Args, world_size: int = 1):
    """Every flag in range; under torchrun the batch is split over `world_size` processes."""
    common.check_flags(args, dict(
        num_steps=1, num_prompts=1, group_size=2, max_new_tokens=1, update_epochs=1, logprob_chunk_size=1,
        eval_batch_size=1, max_skipped=1, clip_eps_low=0, eval_every=0, save_every=0, keep_last=0,
    ), positive=("temperature", "learning_rate", "max_grad_norm", "adv_eps"))
    common.check(args.clip_eps_high >= args.clip_eps_low,
                 f"--clip-eps-high {args.clip_eps_high}: must be at least --clip-eps-low ({args.clip_eps_low})")
    common.check_batches(args, args.group_size, "--group-size", world_size)
    common.check_save_dir(args)


def compute_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Group-relative advantage, DeepSeekMath section 4.1.2 (outcome supervision):
    A_i = (r_i - mean(group)) / (std(group) + eps), unbiased std, one value per completion, shape (B,)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased (N-1), as the reference implementations
    return ((grouped - mean) / (std + eps)).view(-1)


def compute_policy_loss(logp, old_logp, advantages, mask, clip_eps_low: float, clip_eps_high: float):
    """GSPO objective, Qwen eq. 5 with the sequence ratio of eq. 7, as a loss; returns it and detached metrics.
    logp, old_logp, mask: (B, T) over completion tokens; advantages: (B,)."""
    # GSPO eq. 7: s_i = exp((1/|o_i|) sum_t (logp - old_logp)) over the valid tokens of completion i, shape (B,)
    lengths = mask.sum(dim=1).clamp(min=1)
    ratio = torch.exp(((logp - old_logp) * mask).sum(dim=1) / lengths)
    # GSPO eq. 5: min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), one term per completion
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * advantages)
    # mean over the completions (eq. 5's 1/G); the 1/|o_i| already sits inside s_i
    loss = -surrogate.mean()

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        # completions clipped, not tokens: GSPO clips whole responses (section 5.2 counts their tokens instead)
        clipped = ((ratio > 1 + clip_eps_high) & (advantages > 0)) | ((ratio < 1 - clip_eps_low) & (advantages < 0))
        log_ratio = (logp - old_logp) * mask
        metrics = {
            "loss/policy": loss.detach(),
            "policy/clip_frac": clipped.float().mean(),
            # k3 estimate of KL(pi_old || pi), r = pi / pi_old over tokens pi_old sampled; per token as in grpo.py
            "policy/approx_kl": ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum() / tokens,
        }
    return loss, metrics


def accumulate_gradients(model, rollout, old_logp, advantages, minibatch, micro_batch_size, args):
    """Backward pass over one minibatch (row indices), `micro_batch_size` rows at a time. The accumulated gradient
    is the whole minibatch's: the loss is a mean over sequences, so each micro-batch weighs by its share of them."""
    metrics, tokens = {}, rollout.completion_mask[minibatch].sum()
    for rows in minibatch.split(micro_batch_size):
        micro = rollout.select(rows)  # cut to its own longest completion
        logp, _ = common.completion_logprobs(model, micro, args.temperature, chunk_size=args.logprob_chunk_size)
        T = logp.shape[1]
        # old_logp None: on-policy, the policy being updated is the one that sampled (ratio exactly 1)
        old_logp_micro = logp.detach() if old_logp is None else old_logp[rows, :T]
        loss, micro_metrics = compute_policy_loss(
            logp, old_logp_micro, advantages[rows], micro.completion_mask, args.clip_eps_low, args.clip_eps_high,
        )
        share = len(rows) / len(minibatch)
        (loss * share).backward()
        for k, v in micro_metrics.items():  # the minibatch's metrics: its loss, the share of its sequences clipped
            weight = micro.completion_mask.sum() / tokens if k == "policy/approx_kl" else share  # KL: a token mean
            metrics[k] = metrics.get(k, 0) + v * weight
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
        # 1. Rollout: G completions per prompt, contiguous
        t0 = time.time()
        rows = prompts.next(args.num_prompts)[rank * num_prompts : (rank + 1) * num_prompts]
        texts = [common.format_prompt(tokenizer, r["prompt"], task.use_chat_template) for r in rows]
        rollout = common.generate(model, tokenizer, texts, args.group_size, args.max_new_tokens, args.temperature,
                                  eos_ids)
        completions = common.decode_completions(tokenizer, rollout)
        time_generate = time.time() - t0

        # 2. Score and advantages
        t0 = time.time()
        rewards = tasks.score(task, completions, rows, args.group_size).to(device)
        advantages = compute_advantages(rewards, args.group_size, args.adv_eps)
        mask = rollout.completion_mask

        # 3. Log-probs of the sampling policy (old), once per rollout batch; GSPO has no reference model. With one
        # epoch and one minibatch the update's own log-probs, detached, are the old ones: that pass is skipped
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

        # 5. Logging (one host sync per step), evaluation and checkpoints
        logged = {k: torch.stack([m[k] for m in step_metrics]).mean() for k in step_metrics[0]}
        logged.update({
            "reward/mean": rewards.mean(),
            "reward/std": rewards.std(),
            "completion/mean_length": rollout.lengths.float().mean(),
            "completion/truncated_frac": rollout.truncated.float().mean(),
            "policy/entropy": (rollout.entropy * mask).sum() / mask.sum(),
            "optim/grad_norm": grad_norm,
            "groups/zero_std_frac": (rewards.view(-1, args.group_size).std(dim=1) == 0).float().mean(),
        })
        logged = {k: float(v) for k, v in common.mean_over_processes(logged).items()}
        logged.update({
            "optim/lr": optimizer.param_groups[0]["lr"],
            "optim/skipped_steps": skipped_steps,
            "perf/tokens_per_sec": logged["completion/mean_length"] * batch_size / (time_generate + time_train),
            "perf/time_generate": time_generate,
            "perf/time_train": time_train,
        })
        tqdm.write(f"step {step}: reward {logged['reward/mean']:.3f}  loss {logged['loss/policy']:+.4f}"
                   f"  clip {logged['policy/clip_frac']:.3f}  len {logged['completion/mean_length']:.1f}"
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
