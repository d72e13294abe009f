"""PPO for LLMs (InstructGPT, arXiv 2203.02155, section 3.5 and appendix C.4, with the usual RLHF details).

One completion per prompt, and a critic (the backbone with a scalar head, its own AdamW) that predicts at every
token the reward still to come, in place of GRPO's group baseline. The per-token reward is a k1 KL penalty to the
initial policy plus the task score on the last token; advantages come from GAE, whitened over the batch. The loss
is the token-mean clipped surrogate plus vf_coef times the clipped value loss, over 4 epochs per rollout batch.
The choices where papers and implementations differ are in docs/ppo.md.
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
    exp_name: str = "ppo"
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
    num_prompts: common.FromPreset[int] = None
    """prompts per rollout batch, over all processes under torchrun"""
    samples_per_prompt: int = 1
    """completions sampled per prompt"""
    max_new_tokens: common.FromPreset[int] = None
    """maximum completion length"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    learning_rate: common.FromPreset[float] = None
    """AdamW learning rate of the policy"""
    critic_learning_rate: common.FromPreset[float] = None
    """AdamW learning rate of the critic"""
    beta: common.FromPreset[float] = None
    """coefficient of the per-token KL penalty in the reward; 0 loads no reference model"""
    clip_eps: float = 0.2
    """PPO clipping range, symmetric"""
    clip_eps_value: float = 0.2
    """value clipping range around the values at rollout time"""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus subtracted from the loss (0: off, no entropy computed in the update)"""
    gamma: float = 1.0
    """discount factor of GAE"""
    lam: float = 0.95
    """lambda of GAE (0: one-step TD, 1: Monte Carlo returns)"""
    missing_eos_penalty: Optional[float] = None
    """subtracted from the score of completions that end without EOS; unset: no penalty"""
    update_epochs: int = 4
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """optimizer steps per pass (the rollout batch is shuffled and split)"""
    micro_batch_size: common.FromPreset[int] = None
    """rows per forward/backward on each process; the whole minibatch if the preset sets none"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm, for the policy and the critic each"""
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
# `paper`: policy lr 1e-6 and critic lr 9e-6 (OpenRLHF's PPO defaults), beta 0.05 (TRL's), 64 prompts, GSM8K.
PRESETS = {
    "tiny": dict(task="arithmetic", num_steps=40, num_prompts=128, max_new_tokens=40, learning_rate=5e-4,
                 critic_learning_rate=1e-3, beta=0.05, eval_every=10),
    "paper": dict(task="gsm8k", num_steps=1000, num_prompts=64, max_new_tokens=512, learning_rate=1e-6,
                  critic_learning_rate=9e-6, beta=0.05, eval_every=50, micro_batch_size=8),
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
        num_steps=1, num_prompts=1, samples_per_prompt=1, max_new_tokens=1, update_epochs=1, logprob_chunk_size=1,
        eval_batch_size=1, max_skipped=1, beta=0, clip_eps=0, clip_eps_value=0, vf_coef=0, ent_coef=0,
        missing_eos_penalty=0, eval_every=0, save_every=0, keep_last=0,
    ), positive=("temperature", "learning_rate", "critic_learning_rate", "max_grad_norm"))
    common.check(0 <= args.gamma <= 1, f"--gamma {args.gamma}: must be between 0 and 1")
    common.check(0 <= args.lam <= 1, f"--lam {args.lam}: must be between 0 and 1")
    common.check_batches(args, args.samples_per_prompt, "--samples-per-prompt", world_size)
    common.check_save_dir(args)


def compute_rewards(score, old_logp, ref_logp, mask, beta: float) -> torch.Tensor:
    """Per-token reward, InstructGPT eq. 2 spread over tokens: r_t = -beta * (old_logp_t - ref_logp_t) (k1) on
    every completion token, plus the task score on the last one (the EOS, or the last token of a truncated
    completion). score: (B,); old_logp, ref_logp, mask: (B, T). Returns (B, T), 0 where mask is 0."""
    rewards = torch.zeros_like(old_logp) if ref_logp is None else -beta * (old_logp - ref_logp) * mask
    last = mask.sum(dim=1).long() - 1  # the mask is 1 up to and including the last token, then 0
    rows = torch.arange(len(score), device=score.device)
    rewards[rows, last] += score
    return rewards


def compute_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized Advantage Estimation (Schulman et al., arXiv 1506.02438, eq. 16), backwards over the completion
    tokens: delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  with V and A after the
    last valid token = 0. Returns (advantages, returns = advantages + values), both (B, T), 0 where mask is 0."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # V_{t+1}
    next_advantage = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # A_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # a masked position (after the last token) passes V = 0 and A = 0 back to the token before it
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (N-1) variance of x over the positions where mask is 1 (0 for a single position)."""
    count = mask.sum()
    mean = (x * mask).sum() / count
    return (((x - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid tokens, unbiased variance; 0 where mask is 0."""
    mean = (x * mask).sum() / mask.sum()
    return (x - mean) / torch.sqrt(masked_var(x, mask) + 1e-8) * mask


def compute_policy_loss(logp, old_logp, advantages, mask, clip_eps: float, num_tokens):
    """PPO's clipped surrogate (InstructGPT section 3.5; Schulman et al. 2017 eq. 7), as a loss.

    logp, old_logp, advantages, mask: (B, T) over completion tokens; num_tokens: the minibatch's token count.
    Returns the loss (a scalar) and a dict of detached metrics (token means over this batch's own tokens).
    """
    ratio = torch.exp((logp - old_logp) * mask)  # 1 past EOS, whatever the padding holds: exp() stays finite
    adv = advantages
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    # token-mean: sum_{i,t} l[i, t] / sum_i |o_i|, over the whole minibatch
    loss = (per_token * mask).sum() / num_tokens

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
        log_ratio = (logp - old_logp) * mask
        metrics = {
            "loss/policy": (per_token * mask).sum() / tokens,
            "policy/clip_frac": (clipped.float() * mask).sum() / tokens,
            # k3 estimate of KL(pi_old || pi), r = pi / pi_old over tokens pi_old sampled
            "policy/approx_kl": ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum() / tokens,
        }
    return loss, metrics


def compute_value_loss(values, old_values, returns, mask, clip_eps_value: float, num_tokens):
    """Clipped value loss, as in TRL's and OpenAI's PPO: 0.5 * token-mean(max((V - R)^2, (clip(V, V_old - eps_v,
    V_old + eps_v) - R)^2)); values, old_values (at rollout time), returns, mask: (B, T). Returns (loss, metrics)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps_value, clip_eps_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.max(unclipped_error, clipped_error)
    # token-mean: sum_{i,t} v[i, t] / sum_i |o_i|, over the whole minibatch, as the policy loss
    loss = (per_token * mask).sum() / num_tokens

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        metrics = {
            "ppo/value_loss": (per_token * mask).sum() / tokens,
            "ppo/value_clip_frac": ((clipped_error > unclipped_error).float() * mask).sum() / tokens,
        }
    return loss, metrics


def compute_entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, num_tokens) -> torch.Tensor:
    """Minus the token-mean entropy, which ent_coef multiplies in the loss; entropy, mask: (B, T)."""
    return -(entropy * mask).sum() / num_tokens


def completion_values(critic, rollout: common.Rollout) -> torch.Tensor:
    """Critic value of the state before every completion token, (B, T): read at position P - 1 + t, whose output
    predicts completion token t (as common.completion_logprobs), with the same position ids."""
    position_ids = (rollout.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    values = critic(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=position_ids,
                    use_cache=False).logits
    return values[:, rollout.prompt_len - 1 : -1, 0].float()


def accumulate_gradients(
    model, critic, rollout, old_logp, old_values, advantages, returns, minibatch, micro_batch_size, args
):
    """Backward pass over one minibatch (row indices), `micro_batch_size` rows at a time, for the policy and the
    critic. The accumulated gradient is the whole minibatch's: both losses are token-means, and every micro-batch
    divides by the minibatch's token count."""
    metrics, tokens = {}, rollout.completion_mask[minibatch].sum()
    # the token-mean's denominator, averaged over the processes (FSDP averages gradients)
    num_tokens = common.all_reduce(tokens, "mean").clamp(min=1)
    for rows in minibatch.split(micro_batch_size):
        micro = rollout.select(rows)  # cut to its own longest completion
        logp, entropy = common.completion_logprobs(model, micro, args.temperature, with_entropy=args.ent_coef > 0,
                                                   chunk_size=args.logprob_chunk_size)
        T = logp.shape[1]
        values, mask = completion_values(critic, micro), micro.completion_mask
        pg_loss, micro_metrics = compute_policy_loss(
            logp, old_logp[rows, :T], advantages[rows, :T], mask, args.clip_eps, num_tokens
        )
        vf_loss, value_metrics = compute_value_loss(
            values, old_values[rows, :T], returns[rows, :T], mask, args.clip_eps_value, num_tokens
        )
        # total = pg_loss + vf_coef * vf_loss - ent_coef * entropy; the two models share no parameters, so each
        # receives exactly the gradient of its own part
        loss = pg_loss + args.vf_coef * vf_loss
        if args.ent_coef > 0:
            loss = loss + args.ent_coef * compute_entropy_loss(entropy, mask, num_tokens)
        loss.backward()
        for k, v in {**micro_metrics, **value_metrics}.items():  # the minibatch's: token means over all its tokens
            metrics[k] = metrics.get(k, 0) + v * mask.sum() / num_tokens
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
    ref_model = (common.load_model(args.model, device, dtype, args.attn_implementation, trainable=False)
                 if args.beta > 0 else None)  # the frozen initial policy
    # the critic: the initial policy's backbone with a fresh scalar head (InstructGPT 3.5: from the RM), own optimizer
    critic = common.load_critic(args.model, device, dtype, args.attn_implementation, args.gradient_checkpointing)
    eos_ids = common.eos_token_ids(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=args.critic_learning_rate,
                                         weight_decay=args.weight_decay, fused=True)
    prompts = tasks.PromptStream(task.train, args.seed)
    # what a checkpoint saves and --resume restores
    models, optimizers = {"policy": model, "critic": critic}, {"policy": optimizer, "critic": critic_optimizer}
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
    batch_size = num_prompts * args.samples_per_prompt
    minibatch_size = batch_size // args.num_minibatches
    micro_batch_size = args.micro_batch_size or minibatch_size
    for step in tqdm(range(start_step + 1, args.num_steps + 1), initial=start_step, total=args.num_steps,
                     desc=args.exp_name):
        # 1. Rollout: samples_per_prompt completions per prompt, contiguous
        t0 = time.time()
        rows = prompts.next(args.num_prompts)[rank * num_prompts : (rank + 1) * num_prompts]
        texts = [common.format_prompt(tokenizer, r["prompt"], task.use_chat_template) for r in rows]
        rollout = common.generate(model, tokenizer, texts, args.samples_per_prompt, args.max_new_tokens,
                                  args.temperature, eos_ids)
        completions = common.decode_completions(tokenizer, rollout)
        time_generate = time.time() - t0

        # 2. Score
        t0 = time.time()
        rewards = tasks.score(task, completions, rows, args.samples_per_prompt).to(device)
        score = rewards
        if args.missing_eos_penalty is not None:  # TRL's missing_eos_penalty: truncated completions lose it
            score = rewards - args.missing_eos_penalty * rollout.truncated.float()
        mask = rollout.completion_mask

        # 3. Log-probs of the sampling policy (old) and of the reference, and the values, once per rollout batch
        old_logp = common.rollout_logprobs(model, rollout, args.temperature, micro_batch_size)
        ref_logp = None
        if ref_model is not None:
            ref_logp = common.rollout_logprobs(ref_model, rollout, args.temperature, micro_batch_size)
        with torch.no_grad():
            old_values = common.per_micro_batch(lambda part: completion_values(critic, part), rollout, micro_batch_size)
            old_values = old_values * mask
            # per-token rewards (InstructGPT eq. 2: k1 KL on every token, the score on the last), GAE advantages and
            # returns (Schulman et al. 2015), then the advantages whitened over the batch
            token_rewards = compute_rewards(score, old_logp, ref_logp, mask, args.beta)
            advantages, returns = compute_advantages(token_rewards, old_values, mask, args.gamma, args.lam)
            advantages = whiten(advantages, mask)

        # 4. update_epochs x num_minibatches optimizer steps over micro-batches; a non-finite one is skipped
        step_metrics, step_skipped = [], 0
        for epoch in range(args.update_epochs):
            order = torch.randperm(batch_size, device=device)
            for minibatch in order.split(minibatch_size):
                minibatch_metrics = accumulate_gradients(
                    model, critic, rollout, old_logp, old_values, advantages, returns, minibatch, micro_batch_size,
                    args,
                )
                step_metrics.append(minibatch_metrics)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                critic_grad_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                losses = [minibatch_metrics[k] for k in ("loss/policy", "ppo/value_loss")]
                if common.all_finite(grad_norm, critic_grad_norm, *losses):
                    optimizer.step()
                    critic_optimizer.step()
                else:
                    step_skipped += 1
                optimizer.zero_grad(set_to_none=True)  # freed now: generation and evaluation do without them
                critic_optimizer.zero_grad(set_to_none=True)
        skipped_steps += step_skipped
        skipped_in_a_row = skipped_in_a_row + 1 if step_skipped else 0
        time_train = time.time() - t0

        # 5. Logging (one host sync per step), evaluation and checkpoints
        tokens = mask.sum()
        logged = {k: torch.stack([m[k] for m in step_metrics]).mean() for k in step_metrics[0]}
        logged.update({
            "reward/mean": rewards.mean(),
            "reward/std": rewards.std(),
            "completion/mean_length": rollout.lengths.float().mean(),
            "completion/truncated_frac": rollout.truncated.float().mean(),
            "policy/entropy": (rollout.entropy * mask).sum() / tokens,
            "optim/grad_norm": grad_norm,
            "ppo/critic_grad_norm": critic_grad_norm,
            "ppo/mean_value": old_values.sum() / tokens,
            # 1 - Var(R - V) / Var(R) over the valid tokens: 1 for a perfect critic, 0 for a constant one
            "ppo/explained_variance": 1 - masked_var(returns - old_values, mask) / masked_var(returns, mask),
        })
        if ref_logp is not None:  # mean per-token k1 between the sampling policy and the reference
            logged["loss/kl"] = ((old_logp - ref_logp) * mask).sum() / tokens
        if args.samples_per_prompt > 1:  # a group of one has no spread
            logged["groups/zero_std_frac"] = (rewards.view(-1, args.samples_per_prompt).std(dim=1) == 0).float().mean()
        logged = {k: float(v) for k, v in common.mean_over_processes(logged).items()}
        logged.update({
            "optim/lr": optimizer.param_groups[0]["lr"],
            "optim/skipped_steps": skipped_steps,
            "perf/tokens_per_sec": logged["completion/mean_length"] * batch_size / (time_generate + time_train),
            "perf/time_generate": time_generate,
            "perf/time_train": time_train,
        })
        tqdm.write(f"step {step}: reward {logged['reward/mean']:.3f}  loss {logged['loss/policy']:+.4f}"
                   f"  value {logged['ppo/value_loss']:.4f}  ev {logged['ppo/explained_variance']:+.2f}"
                   f"  kl {logged.get('loss/kl', 0.0):.4f}  len {logged['completion/mean_length']:.1f}"
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
