"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (ByteDance Seed, arXiv 2503.14476, eq. 8-13).

GRPO (grpo.py) with these changes, each its own commented block below:
1. Clip-higher (section 3.1, eq. 8): the clip range is asymmetric, 1 - eps_low .. 1 + eps_high with 0.2 / 0.28,
   so a low-probability token with a positive advantage can grow further before the clip stops it.
2. Token-level loss (section 3.3, eq. 8): token-mean aggregation, `sum_{i,t} l[i,t] / sum_i |o_i|`, so every
   token weighs the same instead of every sequence sharing one equal weight among its tokens.
3. No KL term and no reference model (section 2.3).
4. Dynamic sampling (section 3.2, eq. 11): groups whose rewards are all equal have zero advantage and are
   dropped; more prompt batches are generated until `num_prompts` groups survive.
5. Soft overlong punishment (section 3.4, eq. 13) added to the task reward, and overlong filtering
   (truncated completions masked out of the loss) as the --mask-truncated flag, off by default.

Project decisions (see ../shared/ALGORITHMS.md):
- std is the unbiased (N-1) one and eps = 1e-4 is added to it, as in grpo.py.
- The token-mean normaliser is the token count of the whole minibatch (one optimizer step), handed to every
  micro-batch, never a micro-batch's own count: micro-batch gradients add up to the minibatch's exactly.
- Dynamic sampling generates prompt batches until `num_prompts` groups survive or `max_gen_batches`
  (paper code: 10) rounds ran, and trains on exactly `num_prompts` groups (the surplus of the last round is
  cut), on fewer if fewer survived (logged; the minibatch size stays, so there are fewer optimizer steps), and
  skips the update if none did (logged). A group is dropped when its task rewards are all equal (eq. 11: all
  right or all wrong); the overlong penalty is not looked at.
- `L_max` of eq. 13 is --max-new-tokens and `L_cache` defaults to `L_max // 5` (the paper's 4096 of 20480).
  Sampling never exceeds `L_max` tokens, so the -1 branch is only reached by longer inputs.
- reward/*, completion/* and groups/zero_std_frac describe every completion generated in the step (dropped
  groups included); loss/* and policy/* describe the groups trained on. reward is the task reward plus the
  overlong penalty; dapo/overlong_penalty is the penalty alone.
- `old_logp` is computed once per rollout batch (skipped with 1 epoch and 1 minibatch, where it equals the
  update's own log-probs, used detached). Then the ratio is exactly 1 and clipping is inactive, so both
  presets take several optimizer steps per rollout batch (`tiny` 4, `paper` 16).
- Defaults left as None are resolved from a preset: `tiny` for the embedded model (fast CPU run on the
  arithmetic task) and `paper` for any other model (lr 1e-6, 16 minibatches, GSM8K). They are printed at start.
"""

import dataclasses
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import common

SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: --resume refuses another script's


@dataclass
class Args:
    exp_name: str = "dapo"
    """name of this experiment (run name in Weights and Biases)"""
    seed: int = 1
    """seed of python and torch random number generators"""
    model: str = "tiny"
    """hub id or local folder of a causal LM; `tiny` is the 2-layer model shipped in assets/"""
    task: Optional[str] = None
    """arithmetic, countdown, gsm8k or jsonl:PATH (default: from the preset)"""
    preset: Literal["auto", "tiny", "paper"] = "auto"
    """where unset defaults come from: `auto` picks `tiny` for the embedded model, `paper` otherwise"""
    device: str = "auto"
    """`cuda` when available, else `cpu`"""
    num_steps: Optional[int] = None
    """rollout batches to train on (default: from the preset)"""
    num_prompts: int = 16
    """prompts per rollout batch, counted after dynamic sampling (groups with unequal rewards), over all
    processes under torchrun"""
    group_size: int = 16
    """completions sampled per prompt (G)"""
    max_new_tokens: Optional[int] = None
    """maximum completion length (default: from the preset)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    learning_rate: Optional[float] = None
    """AdamW learning rate (default: from the preset)"""
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
    """added to the group std in the advantage denominator"""
    update_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: Optional[int] = None
    """optimizer steps per pass (the rollout batch is shuffled and split); default: from the preset"""
    micro_batch_size: Optional[int] = None
    """rows per forward/backward on each process (gradient accumulation); default: from the preset, else the
    whole minibatch"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    logprob_chunk_size: Optional[int] = None
    """completion tokens projected onto the vocabulary at a time (default: as many as make 2^25 logits, 128 MB
    in fp32)"""
    eval_every: Optional[int] = None
    """evaluate greedy held-out accuracy every N steps (default: from the preset); it always runs at the start
    and the end; 0: only there"""
    save_dir: Optional[str] = None
    """folder for checkpoints (step_N: save_pretrained format, plus what --resume needs) and metrics.jsonl;
    nothing is written if unset"""
    save_every: int = 0
    """write a checkpoint every N steps (0: only at the end, when --save-dir is set)"""
    keep_last: int = 2
    """checkpoints kept in --save-dir, the newest (0: all)"""
    resume: Optional[str] = None
    """continue a run from a checkpoint folder, or from the newest checkpoint in a --save-dir (which then
    defaults to the checkpoint's folder)"""
    max_skipped: int = 3
    """optimizer steps with a non-finite loss or gradient norm are skipped; stop after this many steps in a row
    with such a skip"""
    track: bool = False
    """log to Weights and Biases"""
    wandb_project: str = "rl-post-training"
    """Weights and Biases project"""
    wandb_entity: Optional[str] = None
    """Weights and Biases entity (team)"""


# Values for the fields left as None. `tiny`: the embedded model learns arithmetic in about two minutes on
# a CPU; with 4 optimizer steps per rollout batch (which makes the clip live) it needs fewer steps than
# grpo.py, each dearer as the policy sharpens and dynamic sampling needs more generation rounds.
# `paper`: DAPO's settings (G 16, lr 1e-6, 16 optimizer steps per rollout batch) on GSM8K.
PRESETS = {
    "tiny": dict(task="arithmetic", num_steps=250, max_new_tokens=4, learning_rate=5e-4, num_minibatches=4,
                 eval_every=50),
    "paper": dict(task="gsm8k", num_steps=1000, max_new_tokens=512, learning_rate=1e-6, num_minibatches=16,
                  eval_every=50, micro_batch_size=8),
}


def resolve_args(args: Args) -> Args:
    preset = args.preset if args.preset != "auto" else ("tiny" if common.is_tiny(args.model) else "paper")
    for field, value in PRESETS[preset].items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    args.preset = preset
    if args.resume and args.save_dir is None:  # keep saving where the resumed run saved
        args.save_dir = str(common.find_checkpoint(args.resume).parent)
    if args.overlong_buffer is None:  # DAPO eq. 13: L_cache = L_max // 5, as the paper's 4096 of 20480
        args.overlong_buffer = args.max_new_tokens // 5
    return args


def validate_args(args: Args, world_size: int = 1):
    """Every flag in range; under torchrun the batch is split over `world_size` processes."""
    check = common.check
    check(args.group_size >= 2, f"--group-size {args.group_size}: must be at least 2 (advantages compare a group)")
    check(args.num_prompts >= 1, f"--num-prompts {args.num_prompts}: must be at least 1")
    check(args.num_steps >= 1, f"--num-steps {args.num_steps}: must be at least 1")
    check(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    check(args.temperature > 0, f"--temperature {args.temperature}: must be positive")
    check(args.learning_rate > 0, f"--learning-rate {args.learning_rate}: must be positive")
    check(args.clip_eps_low >= 0, f"--clip-eps-low {args.clip_eps_low}: must be 0 or more")
    check(
        args.clip_eps_high >= args.clip_eps_low,
        f"--clip-eps-high {args.clip_eps_high}: must be at least --clip-eps-low ({args.clip_eps_low})",
    )
    check(
        0 <= args.overlong_buffer <= args.max_new_tokens,
        f"--overlong-buffer {args.overlong_buffer}: must be between 0 and --max-new-tokens ({args.max_new_tokens})",
    )
    check(args.max_gen_batches >= 1, f"--max-gen-batches {args.max_gen_batches}: must be at least 1")
    check(args.adv_eps >= 0, f"--adv-eps {args.adv_eps}: must be 0 or more")
    check(args.max_grad_norm > 0, f"--max-grad-norm {args.max_grad_norm}: must be positive")
    check(args.update_epochs >= 1, f"--update-epochs {args.update_epochs}: must be at least 1")
    check(
        args.logprob_chunk_size is None or args.logprob_chunk_size >= 1,
        f"--logprob-chunk-size {args.logprob_chunk_size}: must be at least 1",
    )
    check(
        args.num_prompts % world_size == 0,
        f"--num-prompts {args.num_prompts}: must be divisible by the number of processes ({world_size})",
    )
    batch = args.num_prompts // world_size * args.group_size
    check(
        args.num_minibatches >= 1 and batch % args.num_minibatches == 0,
        f"--num-minibatches {args.num_minibatches}: must divide the rollout batch of {batch} completions"
        f" (--num-prompts x --group-size / processes)",
    )
    minibatch = batch // args.num_minibatches
    micro = args.micro_batch_size or minibatch
    check(
        micro >= 1 and minibatch % micro == 0,
        f"--micro-batch-size {args.micro_batch_size}: must divide the minibatch of {minibatch} completions",
    )
    check(args.eval_every >= 0 and args.save_every >= 0, "--eval-every and --save-every must be 0 or more")
    check(args.keep_last >= 0, f"--keep-last {args.keep_last}: must be 0 (keep all) or more")
    check(args.max_skipped >= 1, f"--max-skipped {args.max_skipped}: must be at least 1")


def compute_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Group-relative advantage, DeepSeekMath section 4.1.2 (outcome supervision):
    A_i = (r_i - mean(group)) / (std(group) + eps), unbiased std, one value per completion, shape (B,)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased (N-1), as ALGORITHMS.md says
    return ((grouped - mean) / (std + eps)).view(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """Soft overlong punishment, DAPO eq. 13, added to the task reward; shape (B,) like `lengths`.

    0 up to L_max - L_cache tokens, then falling linearly to -1 at L_max, and -1 beyond L_max.
    """
    expected = max_len - cache_len
    lengths = lengths.float()
    # the middle branch is empty when cache_len is 0; the clamp only keeps 0/0 out of the unused values
    linear = (expected - lengths) / max(cache_len, 1)
    return torch.where(lengths <= expected, 0.0, torch.where(lengths <= max_len, linear, -1.0))


def filter_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dynamic sampling, DAPO eq. 11: True for each group whose rewards are not all equal (the groups kept),
    shape (B / group_size,). An all-equal group (all right or all wrong) has zero advantage: no gradient."""
    grouped = rewards.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def compute_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    num_tokens,
):
    """DAPO objective, eq. 8, as a loss: clipped surrogate with decoupled clip range, token-mean, no KL.

    logp, old_logp, mask: (B, T) over completion tokens; advantages: (B,); num_tokens: the number of
    completion tokens (mask ones) in the whole minibatch this micro-batch belongs to, at least 1.
    Returns the loss (a scalar) and a dict of detached metrics, all normalised by `num_tokens`, so the
    losses and metrics of a minibatch's micro-batches add up to those of the minibatch.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    # clip-higher (DAPO section 3.1): 1 - eps_low below, 1 + eps_high above
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * adv)
    # no KL term (DAPO section 2.3)
    per_token = -surrogate
    # token-mean: sum_{i,t} l[i, t] / sum_i |o_i|   (DAPO eq. 8, section 3.3), where sum_i |o_i| is
    # `num_tokens`, counted over the whole minibatch (every micro-batch of one optimizer step)
    loss = (per_token * mask).sum() / num_tokens

    with torch.no_grad():
        clipped = ((ratio > 1 + clip_eps_high) & (adv > 0)) | ((ratio < 1 - clip_eps_low) & (adv < 0))
        log_ratio_old = old_logp - logp
        metrics = {
            "loss/policy": loss.detach(),
            "policy/clip_frac": (clipped.float() * mask).sum() / num_tokens,
            # k3 between the sampling policy and the current one
            "policy/approx_kl": ((torch.exp(log_ratio_old) - log_ratio_old - 1) * mask).sum() / num_tokens,
        }
    return loss, metrics


def accumulate_gradients(model, rollout, old_logp, advantages, minibatch, micro_batch_size, args):
    """Backward pass over one minibatch (row indices), `micro_batch_size` rows at a time.

    The accumulated gradient equals that of the whole minibatch at once: every micro-batch's loss is
    divided by the token count of the whole minibatch (DAPO's token-mean), so the micro-batch losses
    add up to the minibatch loss with no further weighting. Returns the minibatch's metrics.
    """
    metrics = []
    # the token-mean's denominator: this minibatch's token count, averaged over the processes under torchrun,
    # where FSDP averages the gradients: the gradient is then that of the global minibatch's token-mean.
    # At least 1: --mask-truncated can leave no token
    num_tokens = common.all_reduce(rollout.completion_mask[minibatch].sum(), "mean").clamp(min=1)
    # in rollout order, each prompt's rows side by side: the backbone runs a prompt once (completion_logprobs)
    for micro in minibatch.sort().values.split(micro_batch_size):
        # old_logp None: on-policy (main, step 3). The values are then the sampler's own, and the output
        # projection runs in the backward pass only (common.completion_logprobs); the ratio is exactly 1
        sampled = None if old_logp is not None else (rollout.logprobs[micro], rollout.entropy[micro])
        logp, _ = common.completion_logprobs(
            model, rollout.input_ids[micro], rollout.attention_mask[micro], rollout.prompt_len,
            args.temperature, args.logprob_chunk_size, values=sampled,
        )
        old_logp_micro = logp.detach() if old_logp is None else old_logp[micro]
        loss, micro_metrics = compute_policy_loss(
            logp, old_logp_micro, advantages[micro], rollout.completion_mask[micro],
            args.clip_eps_low, args.clip_eps_high, num_tokens,
        )
        loss.backward()
        metrics.append(micro_metrics)
    return {k: torch.stack([m[k] for m in metrics]).sum() for k in metrics[0]}


PER_ROW = [f.name for f in dataclasses.fields(common.Rollout) if f.name != "prompt_len"]


def take_rows(rollout: common.Rollout, rows: torch.Tensor) -> common.Rollout:
    """The rollout restricted to the row indices `rows` (the padded prompt width is unchanged)."""
    return dataclasses.replace(rollout, **{name: getattr(rollout, name)[rows] for name in PER_ROW})


def concat_rollouts(rollouts: list[common.Rollout], pad_id: int) -> common.Rollout:
    """Stack the rollouts of several dynamic-sampling rounds (DAPO) into one.

    Completions all have the same width (max_new_tokens), but each round's prompts were left-padded to
    their own widest prompt: left-pad every round to the widest of all (pad id, attention 0).
    """
    width = max(r.prompt_len for r in rollouts)
    input_ids = torch.cat([F.pad(r.input_ids, (width - r.prompt_len, 0), value=pad_id) for r in rollouts])
    attention_mask = torch.cat([F.pad(r.attention_mask, (width - r.prompt_len, 0), value=0) for r in rollouts])
    completion_fields = [name for name in PER_ROW if name not in ("input_ids", "attention_mask")]
    stacked = {name: torch.cat([getattr(r, name) for r in rollouts]) for name in completion_fields}
    return common.Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_len=width, **stacked)


def main(args: Args):
    args = resolve_args(args)
    validate_args(args, common.world_size())
    device = common.get_device(args.device)
    # torchrun: join the process group (common.init_distributed); every process samples its own completions,
    # all of them take part in evaluating and saving, and only rank 0 prints and logs
    rank = common.init_distributed(device)
    common.seed_everything(args.seed + rank)
    track = args.track and rank == 0
    print("resolved arguments: " + ", ".join(f"{k}={v}" for k, v in asdict(args).items()))

    tokenizer = common.load_tokenizer(args.model)
    task = common.load_task(args.task)
    model = common.load_model(args.model, device, args.gradient_checkpointing)
    # torchrun: FSDP2 shards the model over the processes (common.shard_model); one process: unchanged
    model = common.shard_model(model)
    eos_ids = common.eos_token_ids(model, tokenizer)
    # fused: one kernel over all parameters (the default per-parameter loop is several times slower on the CPU)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True
    )
    prompts = common.PromptStream(task.train, args.seed)
    # what a checkpoint saves and --resume restores
    models, optimizers = {"policy": model}, {"policy": optimizer}
    if track:
        import wandb

        wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.exp_name, config=asdict(args))

    def run_eval(step):
        accuracy, samples = common.evaluate(model, tokenizer, task, args.max_new_tokens, eos_ids)
        tqdm.write(f"step {step}: held-out greedy accuracy {accuracy:.3f} ({len(task.eval)} prompts)")
        if track:
            table = wandb.Table(columns=["prompt", "completion", "reward"], data=[list(s) for s in samples[:8]])
            wandb.log({"eval/accuracy": accuracy, "eval/samples": table}, step=step)
        return accuracy

    def save(step):
        path = common.save_training_state(
            args.save_dir, step, SCRIPT, tokenizer, models, optimizers, prompts,
            {"skipped_steps": skipped_steps, "skipped_in_a_row": skipped_in_a_row}, args.keep_last,
        )
        tqdm.write(f"saved {path}")

    # resume: weights, optimizer states, the prompt stream's position and the RNG states (common.py)
    start_step, skipped_steps, skipped_in_a_row = 0, 0, 0
    if args.resume:
        start_step, extra = common.load_training_state(args.resume, SCRIPT, models, optimizers, prompts, args.save_dir)
        skipped_steps, skipped_in_a_row = extra["skipped_steps"], extra["skipped_in_a_row"]
        common.check(
            start_step < args.num_steps, f"--num-steps {args.num_steps}: the checkpoint is already at step {start_step}"
        )
    start_accuracy = run_eval(start_step)
    num_prompts = args.num_prompts // common.world_size()  # this process's share of each rollout batch
    batch_size = num_prompts * args.group_size
    minibatch_size = batch_size // args.num_minibatches
    micro_batch_size = args.micro_batch_size or minibatch_size
    start_time = time.time()
    for step in tqdm(
        range(start_step + 1, args.num_steps + 1), initial=start_step, total=args.num_steps, desc=args.exp_name,
        file=sys.stdout,
    ):
        # 1. Rollout and scoring with dynamic sampling (DAPO eq. 11): G completions per prompt, contiguous;
        # keep the groups whose task rewards are not all equal, generating prompt batches until num_prompts
        # groups survive or max_gen_batches rounds ran, and cut the surplus of the last round. Under torchrun
        # each process fills its share, and all go on generating until the one with the fewest groups is done
        t0 = time.time()
        kept, generated, gen_batches, num_groups, dropped_groups = [], [], 0, 0, 0
        while common.min_over_processes(num_groups, device) < num_prompts and gen_batches < args.max_gen_batches:
            gen_batches += 1
            rows = prompts.next(args.num_prompts)[rank * num_prompts : (rank + 1) * num_prompts]
            texts = [common.format_prompt(tokenizer, r["prompt"], task.use_chat_template) for r in rows]
            rollout = common.generate(
                model, tokenizer, texts, args.group_size, args.max_new_tokens, args.temperature, eos_ids
            )
            completions = common.decode_completions(tokenizer, rollout)
            task_rewards = common.score(task, completions, rows, args.group_size).to(device)
            # soft overlong punishment (DAPO eq. 13), added to the task reward
            penalty = overlong_penalty(rollout.lengths, args.max_new_tokens, args.overlong_buffer)
            rewards = task_rewards + penalty
            survivors = filter_groups(task_rewards, args.group_size)
            dropped_groups += int((~survivors).sum())
            groups = survivors.nonzero().squeeze(1)[: num_prompts - num_groups]
            keep = (groups[:, None] * args.group_size + torch.arange(args.group_size, device=device)).view(-1)
            kept.append((take_rows(rollout, keep), rewards[keep]))
            generated.append((rewards, penalty, rollout.lengths, rollout.truncated))
            num_groups += len(groups)
        time_generate = time.time() - t0
        # torchrun: every process trains on as many groups as the one with the fewest (FSDP's passes must match)
        num_groups = common.min_over_processes(num_groups, device)
        if num_groups == 0:  # DAPO: every group of every round had equal rewards: nothing to learn, skip the update
            tqdm.write(f"step {step}: all {dropped_groups} groups of {gen_batches} generation batches had equal"
                       " rewards; update skipped")
            skipped = {"dapo/gen_batches": gen_batches, "dapo/dropped_groups": dropped_groups, "dapo/kept_groups": 0}
            if track:
                wandb.log(skipped, step=step)
            common.append_metrics(args.save_dir, step, skipped)
            if args.eval_every and step % args.eval_every == 0 and step != args.num_steps:
                run_eval(step)
            if args.save_dir and args.save_every and step % args.save_every == 0:
                save(step)
            continue
        if num_groups < num_prompts:  # DAPO: fewer groups survived than asked for: train on those
            tqdm.write(f"step {step}: only {num_groups} of {num_prompts} groups had unequal rewards in"
                       f" {gen_batches} generation batches; training on them")
        rollout = concat_rollouts([r for r, _ in kept], tokenizer.pad_token_id)
        rewards = torch.cat([r for _, r in kept])
        if len(rewards) > num_groups * args.group_size:  # torchrun: this process kept more than the fewest
            rows_kept = torch.arange(num_groups * args.group_size, device=device)
            rollout, rewards = take_rows(rollout, rows_kept), rewards[rows_kept]
        batch_size = len(rewards)  # DAPO: fewer than num_prompts groups when fewer survived

        # 2. Advantages
        t0 = time.time()
        advantages = compute_advantages(rewards, args.group_size, args.adv_eps)
        if args.mask_truncated:  # overlong filtering (DAPO section 3.4): truncated completions leave the loss
            rollout.completion_mask = rollout.completion_mask * ~rollout.truncated[:, None]
        mask = rollout.completion_mask

        # 3. Log-probs of the sampling policy (old), once per rollout batch; no reference model (DAPO section 2.3).
        # With one epoch and one minibatch the policy is still the sampling one when the loss is computed: the
        # old log-probs are then the sampler's (Rollout.logprobs), and their pass is skipped
        with torch.no_grad():
            old_logp = None
            if args.update_epochs > 1 or args.num_minibatches > 1:
                old_logp, _ = common.completion_logprobs(
                    model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, args.temperature,
                    args.logprob_chunk_size,
                )

        # 4. update_epochs x num_minibatches optimizer steps, each accumulated over micro-batches; a
        # step whose loss or gradient norm is not finite is skipped (one host sync per optimizer step to know)
        step_metrics, step_skipped = [], 0
        for epoch in range(args.update_epochs):
            order = torch.randperm(batch_size, device=device)
            for minibatch in order.split(minibatch_size):
                minibatch_metrics = accumulate_gradients(
                    model, rollout, old_logp, advantages, minibatch, micro_batch_size, args
                )
                step_metrics.append(minibatch_metrics)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                losses = [minibatch_metrics["loss/policy"]]
                if common.all_finite(grad_norm, *losses):
                    optimizer.step()
                else:  # a NaN or inf loss or gradient norm: skip this optimizer step
                    step_skipped += 1
                # freed now, not before the next backward: generation and evaluation do without them
                optimizer.zero_grad(set_to_none=True)
        skipped_steps += step_skipped
        time_train = time.time() - t0

        # 5. Logging: one host sync per step. DAPO: reward and completion statistics over every completion
        # generated in step 1, the dropped groups included; loss and policy statistics over the groups trained on
        all_rewards, all_penalty, all_lengths, all_truncated = (torch.cat(x) for x in zip(*generated))
        tokens = mask.sum().clamp(min=1)  # --mask-truncated can leave no token
        logged = {k: torch.stack([m[k] for m in step_metrics]).mean() for k in step_metrics[0]}
        logged.update({
            "reward/mean": all_rewards.mean(),
            "reward/std": all_rewards.std(),
            "completion/mean_length": all_lengths.float().mean(),
            "completion/truncated_frac": all_truncated.float().mean(),
            "policy/entropy": (rollout.entropy * mask).sum() / tokens,
            "optim/grad_norm": grad_norm,
            "groups/zero_std_frac": (all_rewards.view(-1, args.group_size).std(dim=1) == 0).float().mean(),
            "dapo/overlong_penalty": all_penalty.mean(),
        })
        logged = {k: float(v) for k, v in common.mean_over_processes(logged).items()}
        logged.update({
            "optim/lr": optimizer.param_groups[0]["lr"],
            "optim/skipped_steps": skipped_steps,  # optimizer steps skipped so far
            "perf/tokens_per_sec": logged["completion/mean_length"] * len(all_lengths) / (time_generate + time_train),
            "perf/time_generate": time_generate,
            "perf/time_train": time_train,
            "dapo/gen_batches": gen_batches,
            "dapo/dropped_groups": dropped_groups,
            "dapo/kept_groups": num_groups,
        })
        tqdm.write(
            f"step {step}: reward {logged['reward/mean']:.3f}  loss {logged['loss/policy']:+.4f}"
            f"  batches {gen_batches}  kept {num_groups}  len {logged['completion/mean_length']:.1f}"
            f"  grad {logged['optim/grad_norm']:.3f}  {logged['perf/tokens_per_sec']:.0f} tok/s"
        )
        if track:
            wandb.log(logged, step=step)
        common.append_metrics(args.save_dir, step, logged)
        if step_skipped:
            tqdm.write(f"step {step}: {step_skipped} optimizer step(s) skipped: non-finite loss or gradient norm")
        skipped_in_a_row = skipped_in_a_row + 1 if step_skipped else 0
        common.check(
            skipped_in_a_row < args.max_skipped,
            f"stopping at step {step}: {skipped_in_a_row} steps in a row had a non-finite loss or gradient norm"
            f" (--max-skipped {args.max_skipped}); the checkpoints saved before are intact",
        )
        if args.eval_every and step % args.eval_every == 0 and step != args.num_steps:
            run_eval(step)
        if args.save_dir and args.save_every and step % args.save_every == 0:
            save(step)

    accuracy = run_eval(args.num_steps)
    print(f"held-out greedy accuracy: start {start_accuracy:.3f} -> end {accuracy:.3f}"
          f" ({time.time() - start_time:.0f}s of training)")
    if args.save_dir and not (args.save_every and args.num_steps % args.save_every == 0):  # else saved already
        save(args.num_steps)
    if track:
        wandb.finish()
    common.finish_distributed()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except common.UserError as e:
        common.fail(str(e))
