"""GFPO: Group Filtered Policy Optimization (Microsoft, arXiv 2508.09726, eq. 2, Algorithms 1-2).

GRPO (grpo.py) with a filter, for shorter completions: sample G per prompt, retain the k that score best on
--metric (the shortest, or the most reward per token) and train on those alone, with advantages normalised within
them. The loss is a token-mean over the retained tokens with an entropy bonus; with one epoch and one minibatch (the
default) the ratio is exactly 1. --adaptive-k sets k per prompt from its difficulty (Algorithm 2). See docs/gfpo.md.
"""

import math
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
    exp_name: str = "gfpo"
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
    k: int = 8
    """completions retained per prompt for the update (GFPO: 8 of G = 16)"""
    metric: str = "token_efficiency"
    """what the k retained are best at: `length` (shortest) or `token_efficiency` (highest reward / length)"""
    adaptive_k: bool = False
    """GFPO Algorithm 2: k per prompt from its difficulty's quartile in the history (harder keeps more)"""
    max_new_tokens: common.FromPreset[int] = None
    """maximum completion length"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    learning_rate: common.FromPreset[float] = None
    """AdamW learning rate"""
    beta: common.FromPreset[float] = None
    """KL coefficient; 0 loads no reference model"""
    clip_eps: float = 0.2
    """PPO clipping range, symmetric"""
    ent_coef: float = 0.001
    """weight of the entropy bonus subtracted from the loss (the paper's 0.001; 0: off)"""
    adv_eps: float = 1e-4
    """added to the group std in the advantage denominator; positive, so a group of equal rewards gets 0, not 0/0"""
    update_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: int = 1
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
# `paper`: GFPO's KL coefficient (beta 0.001) with grpo.py's lr 1e-6 on GSM8K.
PRESETS = {
    "tiny": dict(task="arithmetic", num_steps=100, max_new_tokens=40, learning_rate=5e-4, beta=0.04, eval_every=25),
    "paper": dict(task="gsm8k", num_steps=1000, max_new_tokens=512, learning_rate=1e-6, beta=0.001, eval_every=50,
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
        num_steps=1, num_prompts=1, group_size=2, max_new_tokens=1, update_epochs=1, logprob_chunk_size=1, ent_coef=0,
        eval_batch_size=1, max_skipped=1, beta=0, clip_eps=0, eval_every=0, save_every=0, keep_last=0,
    ), positive=("temperature", "learning_rate", "max_grad_norm", "adv_eps"))
    common.check(args.metric in ("length", "token_efficiency"), f"--metric {args.metric}: length or token_efficiency")
    common.check(2 <= args.k < args.group_size,  # k = G is GRPO, k = 1 leaves nothing to compare
                 f"--k {args.k}: must be at least 2 and less than --group-size {args.group_size}")
    common.check(not (args.adaptive_k and world_size > 1), "--adaptive-k: one process only (the retained rows would"
                 " differ between processes, whose FSDP passes must match)")
    common.check_batches(args, args.k, "--k", world_size)  # GFPO: only the retained completions are trained on
    common.check(not args.adaptive_k or args.num_prompts * max(2, math.ceil(args.k / 2)) >= args.num_minibatches,
                 f"--num-minibatches {args.num_minibatches}: --adaptive-k may retain --num-prompts x max(2, ceil(k/2))")
    common.check_save_dir(args)


def select_retained(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int, k, metric: str) -> torch.Tensor:
    """GFPO Algorithm 1: a keep-mask (B,) of the k of each prompt's G completions that score best on `metric`
    (`length`: the shortest; `token_efficiency`: the highest reward / length), ties to the lower index; k: int, (N,)"""
    lengths = lengths.float()
    score = -lengths if metric == "length" else rewards / lengths  # higher is better
    order = torch.sort(score.view(-1, group_size), dim=1, descending=True, stable=True).indices
    k = torch.as_tensor(k, device=rewards.device).expand(order.shape[0])
    in_top_k = torch.arange(group_size, device=rewards.device)[None, :] < k[:, None]  # by rank
    return torch.zeros_like(in_top_k).scatter(1, order, in_top_k).view(-1)


def adaptive_k(difficulty: torch.Tensor, history: torch.Tensor, k: int, min_history: int) -> torch.Tensor:
    """GFPO Algorithm 2: k per prompt (N,) from where its difficulty (mean reward, low = hard) falls in the history's
    quartiles: below q25 or q50 k, below q75 ceil(3k/4), else ceil(k/2), at least 2 (the paper's 8, 8, 6, 4 at k = 8);
    k for every prompt until the history holds `min_history` values."""
    if history.numel() < min_history:
        return torch.full(difficulty.shape, k, dtype=torch.long, device=difficulty.device)
    quartiles = torch.quantile(history.float(), torch.tensor([0.25, 0.5, 0.75], device=history.device))
    bucket = (difficulty[:, None] >= quartiles[None, :]).sum(dim=1)  # 0: below q25 (hardest) .. 3: q75 or more
    ks = torch.tensor([k, k, max(2, math.ceil(3 * k / 4)), max(2, math.ceil(k / 2))], device=difficulty.device)
    return ks[bucket]


def compute_advantages(rewards: torch.Tensor, keep: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """GFPO eq. 2: advantages over each prompt's retained set S only, A_i = (r_i - mean_S) / (std_S + eps) for i in
    S, population std as the paper writes it; A_i = 0 for the filtered-out completions. rewards, keep: (B,)."""
    grouped = rewards.view(-1, group_size)
    kept = keep.view(-1, group_size).to(grouped.dtype)
    size = kept.sum(dim=1, keepdim=True)
    mean = (grouped * kept).sum(dim=1, keepdim=True) / size
    std = (((grouped - mean) ** 2 * kept).sum(dim=1, keepdim=True) / size).sqrt()  # population (N), the paper's
    return (kept * (grouped - mean) / (std + eps)).view(-1)


def compute_policy_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, beta: float, num_tokens):
    """GFPO objective, eq. 2: GRPO's as a token-mean (footnote 1, num_tokens: the minibatch's), as a loss; returns it
    and detached metrics. logp, old_logp, ref_logp, mask: (B, T) over completion tokens; advantages: (B,)."""
    ratio = torch.exp((logp - old_logp) * mask)  # 1 past EOS, whatever the padding holds: exp() stays finite
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    if beta > 0:
        # k3 estimator of KL(pi || pi_ref), DeepSeekMath eq. 4; >= 0 per token
        log_ratio_ref = (ref_logp - logp) * mask  # 0 past EOS, where ref_logp may be padding: exp() stays finite
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
        per_token = per_token + beta * kl
    # token-mean: sum_{i,t} l[i, t] / sum_i |o_i| over the minibatch's retained completions (footnote 1)
    loss = (per_token * mask).sum() / num_tokens

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
        log_ratio = (logp - old_logp) * mask
        metrics = {
            "loss/policy": (per_token * mask).sum() / tokens,  # this micro-batch's own token-mean, weighed later
            "policy/clip_frac": (clipped.float() * mask).sum() / tokens,
            # k3 estimate of KL(pi_old || pi), r = pi / pi_old over tokens pi_old sampled
            "policy/approx_kl": ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum() / tokens,
        }
        if beta > 0:
            metrics["loss/kl"] = (kl * mask).sum() / tokens
    return loss, metrics


def compute_entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, num_tokens) -> torch.Tensor:
    """Minus the token-mean entropy, which ent_coef multiplies in the loss; entropy, mask: (B, T)."""
    return -(entropy * mask).sum() / num_tokens


def accumulate_gradients(model, rollout, old_logp, ref_logp, advantages, minibatch, micro_batch_size, args):
    """Backward pass over one minibatch (row indices), `micro_batch_size` rows at a time. The accumulated gradient
    is the whole minibatch's: each micro-batch divides by the minibatch's token count (over processes, the mean)."""
    metrics, tokens = {}, rollout.completion_mask[minibatch].sum()
    num_tokens = common.all_reduce(tokens, "mean")
    for rows in minibatch.split(micro_batch_size):
        micro = rollout.select(rows)  # cut to its own longest completion
        logp, entropy = common.completion_logprobs(model, micro, args.temperature, with_entropy=args.ent_coef > 0,
                                                   chunk_size=args.logprob_chunk_size)
        T = logp.shape[1]
        # old_logp None: on-policy, the policy being updated is the one that sampled (ratio exactly 1)
        old_logp_micro = logp.detach() if old_logp is None else old_logp[rows, :T]
        loss, micro_metrics = compute_policy_loss(
            logp, old_logp_micro, None if ref_logp is None else ref_logp[rows, :T], advantages[rows],
            micro.completion_mask, args.clip_eps, args.beta, num_tokens,
        )
        if args.ent_coef > 0:
            loss = loss + args.ent_coef * compute_entropy_loss(entropy, micro.completion_mask, num_tokens)
        loss.backward()
        for k, v in micro_metrics.items():  # the minibatch's metrics: its loss; token means over all its tokens
            metrics[k] = metrics.get(k, 0) + v * micro.completion_mask.sum() / num_tokens
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
        extra = {"skipped_steps": skipped_steps, "skipped_in_a_row": skipped_in_a_row, "start_eval": start_eval,
                 "history": history}
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
    history = torch.empty(0, device=device)  # GFPO Algorithm 2: the difficulties seen so far
    if args.resume:
        start_step, extra = common.load_training_state(args.resume, SCRIPT, models, optimizers, prompts, args.save_dir,
                                                       args.num_steps)
        skipped_steps, skipped_in_a_row = extra["skipped_steps"], extra["skipped_in_a_row"]
        history = extra["history"].to(device)
    start_time = time.time()
    start_eval = extra["start_eval"] if args.resume else run_eval(0)  # a resumed run keeps its start's evaluation
    if not args.resume:
        common.log_metrics(args.save_dir, 0, {**start_eval, "perf/elapsed": 0.0}, track)
    num_prompts = args.num_prompts // common.world_size()  # this process's share of each rollout batch
    batch_size = num_prompts * args.group_size
    minibatch_size = num_prompts * args.k // args.num_minibatches  # GFPO: minibatches of retained rows
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

        # 2. Score, retain k of G per prompt (GFPO Algorithms 1-2), advantages over the retained set
        t0 = time.time()
        rewards = tasks.score(task, completions, rows, args.group_size).to(device)
        k = torch.full((num_prompts,), args.k, device=device)
        if args.adaptive_k:  # Algorithm 2: difficulty = mean reward of a prompt's G completions
            difficulty = rewards.view(-1, args.group_size).mean(dim=1)
            history = torch.cat([history, difficulty[difficulty.isfinite()]])  # a NaN reward must not poison it
            k = adaptive_k(difficulty, history, args.k, min_history=4 * args.num_prompts)
        keep = select_retained(rewards, rollout.lengths, args.group_size, k, args.metric)
        advantages = compute_advantages(rewards, keep, args.group_size, args.adv_eps)
        retained_zero_std = (advantages.view(-1, args.group_size) == 0).all(dim=1)
        # GFPO eq. 2: filtered-out completions have zero advantage: drop them, no forward or backward on them
        sampled, rollout, advantages = rollout, rollout.select(keep), advantages[keep]
        mask = rollout.completion_mask

        # 3. Log-probs of the sampling policy (old) and of the reference, once per rollout batch. With one epoch
        # and one minibatch the update's own log-probs, detached, are the old ones: that pass is skipped
        old_logp = ref_logp = None
        if args.update_epochs > 1 or args.num_minibatches > 1:
            old_logp = common.rollout_logprobs(model, rollout, args.temperature, micro_batch_size)
        if ref_model is not None:
            ref_logp = common.rollout_logprobs(ref_model, rollout, args.temperature, micro_batch_size)

        # 4. update_epochs x num_minibatches optimizer steps over micro-batches; a non-finite one is skipped
        step_metrics, step_skipped = [], 0
        for epoch in range(args.update_epochs):
            order = torch.randperm(len(advantages), device=device)
            for minibatch in order.tensor_split(args.num_minibatches):  # even split: --adaptive-k varies the rows
                minibatch_metrics = accumulate_gradients(model, rollout, old_logp, ref_logp, advantages, minibatch,
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
            "completion/mean_length": sampled.lengths.float().mean(),
            "completion/truncated_frac": sampled.truncated.float().mean(),
            "policy/entropy": (rollout.entropy * mask).sum() / mask.sum(),
            "optim/grad_norm": grad_norm,
            "groups/zero_std_frac": (rewards.view(-1, args.group_size).std(dim=1) == 0).float().mean(),
            "gfpo/retained_zero_std_frac": retained_zero_std.float().mean(),
            "gfpo/retained_k": k.float().mean(),
            "gfpo/retained_mean_length": rollout.lengths.float().mean(),
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
                   f"  kl {logged.get('loss/kl', 0.0):.4f}  len {logged['completion/mean_length']:.1f}"
                   f"  grad {logged['optim/grad_norm']:.3f}  {logged['perf/tokens_per_sec']:.0f} tok/s"
                   f"  k {logged['gfpo/retained_k']:.2f}")
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
