"""GFPO: Group Filtered Policy Optimization (Microsoft, arXiv 2508.09726, eq. 2, Algorithms 1-2).

GRPO with a filter: sample a larger group of G completions per prompt, keep only the k that score best on
a metric (the shortest, or the most reward per token), and train on those k alone, with advantages
normalised inside the retained set. Sampling more and learning only from the concise completions teaches
the policy to answer briefly ("sample more to think less").

What changes versus grpo.py (each block cites the paper):
- `select_retained`: per prompt, keep k of the G completions by --metric: `length` (the k shortest) or
  `token_efficiency` (the k highest reward / length). Ties go to the lower index (stable sort).
- `compute_advantages`: A_i = (r_i - mean_S) / (std_S + eps) over the retained set S, with the population
  std as the paper writes it (grpo.py uses the unbiased one); A_i = 0 outside S.
- Filtered-out completions carry zero advantage, so they are dropped from the update entirely: no old or
  reference log-probs, no forward or backward pass is spent on them.
- `compute_policy_loss`: token-mean aggregation (paper footnote 1, DAPO's aggregation) with the symmetric
  clip, divided by `num_tokens`, the token count of the whole minibatch, so micro-batching is exact.
- `--adaptive-k` (Algorithm 2): k per prompt from the quartiles of a history of prompt difficulties.
- Own metrics: `gfpo/retained_k` (mean k), `gfpo/retained_mean_length`, `gfpo/all_mean_length`,
  `gfpo/retained_zero_std_frac` (prompts whose retained rewards are all equal: no learning signal).

Project decisions (see ../shared/ALGORITHMS.md):
- std_S is the population std (ALGORITHMS.md: GFPO is the exception to the unbiased std); eps = 1e-4 is
  added to it; a retained set whose rewards are all equal gets zero advantage.
- Token normaliser: only the retained tokens of the minibatch are counted. The paper's eq. 2 as written
  also counts the tokens of the filtered-out completions (which add nothing to the numerator); counting
  them would only shrink the loss by a batch-dependent factor, for rows this script never trains on.
- Default metric `token_efficiency`: it gives the paper's largest cut in GRPO's length inflation (71-85%,
  against 46-71% for `length`), and it is the metric that sees the reward, so on a task whose correct
  answers can be longer than wrong ones (two-digit sums here) the filter does not discard them.
- Entropy bonus: the paper's 0.001 (--ent-coef), subtracted from the loss times the token-mean entropy of
  softmax(logits / temperature) over the minibatch's retained tokens (the loss's own normaliser).
- `--adaptive-k`: a prompt's difficulty is the mean reward of its G completions; the history holds every
  difficulty seen so far, this batch's included. Until it holds 4 x --num-prompts values (4 batches) every
  prompt keeps --k. Then, with q25/q50/q75 the quartiles of the history (linear interpolation; the paper
  streams them with a t-digest), a difficulty below q25 or below q50 keeps k, below q75 ceil(3k/4), the
  rest ceil(k/2), at least 2: the paper's 8, 8, 6, 4 at G = 16, k = 8. The retained count then varies per
  step, and each pass is split into --num-minibatches minibatches as even as possible. "Below" is strict: a
  difficulty equal to a quartile goes to the easier bucket.
- --metric is a plain string checked in validate_args, so an unknown one gets the one-line error.
- `completion/mean_length` and `completion/truncated_frac` cover all G sampled completions (what the policy
  writes); `policy/entropy` covers the retained tokens, the ones trained on.
- `old_logp` is computed once per rollout batch. With the defaults (1 epoch, 1 minibatch) it equals the
  update's own log-probs, so that pass is skipped and they are used detached: the ratio is exactly 1 and
  clipping is inactive. Raise --update-epochs / --num-minibatches to go off-policy.
- Defaults left as None are resolved from a preset: `tiny` for the embedded model (fast CPU run on the
  arithmetic task) and `paper` for any other model (the paper's beta 0.001; lr 1e-6 and GSM8K as grpo.py).
  They are printed at start.
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import tyro
from tqdm import tqdm

import common

SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: --resume refuses another script's


@dataclass
class Args:
    exp_name: str = "gfpo"
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
    """prompts per rollout batch, over all processes under torchrun"""
    group_size: int = 16
    """completions sampled per prompt (G); only k of them are trained on"""
    k: int = 8
    """completions retained per prompt for the update (GFPO: 8 of G = 16)"""
    metric: str = "token_efficiency"
    """what the k retained are best at: `length` (shortest) or `token_efficiency` (highest reward / length)"""
    adaptive_k: bool = False
    """GFPO Algorithm 2: k per prompt from its difficulty's quartile in the history (harder keeps more)"""
    max_new_tokens: Optional[int] = None
    """maximum completion length (default: from the preset)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    learning_rate: Optional[float] = None
    """AdamW learning rate (default: from the preset)"""
    beta: Optional[float] = None
    """KL coefficient (default: from the preset); 0 loads no reference model"""
    clip_eps: float = 0.2
    """PPO clipping range, symmetric"""
    ent_coef: float = 0.001
    """weight of the entropy bonus subtracted from the loss (the paper's 0.001; 0: off)"""
    adv_eps: float = 1e-4
    """added to the group std in the advantage denominator"""
    update_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """optimizer steps per pass (the rollout batch is shuffled and split)"""
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


# Values for the fields left as None. `tiny`: the embedded model learns arithmetic in about a minute on
# a CPU. `paper`: GFPO's KL coefficient (beta 0.001) with grpo.py's lr 1e-6 on GSM8K.
PRESETS = {
    "tiny": dict(task="arithmetic", num_steps=1000, max_new_tokens=4, learning_rate=5e-4, beta=0.04, eval_every=100),
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
    check = common.check
    check(args.group_size >= 2, f"--group-size {args.group_size}: must be at least 2 (advantages compare a group)")
    check(args.metric in ("length", "token_efficiency"), f"--metric {args.metric}: choose length or token_efficiency")
    # GFPO: retain 2 <= k < G (k = G is GRPO, k = 1 leaves nothing to compare)
    check(
        2 <= args.k < args.group_size,
        f"--k {args.k}: must be at least 2 and less than --group-size {args.group_size} (k of G are retained)",
    )
    check(args.num_prompts >= 1, f"--num-prompts {args.num_prompts}: must be at least 1")
    check(args.num_steps >= 1, f"--num-steps {args.num_steps}: must be at least 1")
    check(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    check(args.temperature > 0, f"--temperature {args.temperature}: must be positive")
    check(args.learning_rate > 0, f"--learning-rate {args.learning_rate}: must be positive")
    check(args.beta >= 0, f"--beta {args.beta}: must be 0 or more")
    check(args.clip_eps >= 0, f"--clip-eps {args.clip_eps}: must be 0 or more")
    check(args.ent_coef >= 0, f"--ent-coef {args.ent_coef}: must be 0 or more")
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
    batch = args.num_prompts // world_size * args.k  # GFPO: only the retained completions are trained on
    check(
        args.num_minibatches >= 1 and batch % args.num_minibatches == 0,
        f"--num-minibatches {args.num_minibatches}: must divide the {batch} retained completions"
        f" (--num-prompts x --k / processes)",
    )
    minibatch = batch // args.num_minibatches
    micro = args.micro_batch_size or minibatch
    check(
        micro >= 1 and minibatch % micro == 0,
        f"--micro-batch-size {args.micro_batch_size}: must divide the minibatch of {minibatch} completions",
    )
    check(args.eval_every >= 0 and args.save_every >= 0, "--eval-every and --save-every must be 0 or more")
    check(
        not (args.adaptive_k and world_size > 1),
        "--adaptive-k: one process only (the retained rows would differ between processes, whose FSDP passes"
        " must match)",
    )
    check(args.keep_last >= 0, f"--keep-last {args.keep_last}: must be 0 (keep all) or more")
    check(args.max_skipped >= 1, f"--max-skipped {args.max_skipped}: must be at least 1")


def select_retained(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int, k, metric: str) -> torch.Tensor:
    """GFPO Algorithm 1: per prompt, retain the k of its G completions that score best on `metric`.

    rewards, lengths: (B,) with B = N x G; k: an int, or (N,) integers, one per prompt.
    `length` retains the k shortest, `token_efficiency` the k highest reward / length; ties go to the
    lower index (stable sort). Returns a bool keep-mask of shape (B,).
    """
    lengths = lengths.float()
    score = -lengths if metric == "length" else rewards / lengths  # higher is better
    order = torch.sort(score.view(-1, group_size), dim=1, descending=True, stable=True).indices
    k = torch.as_tensor(k, device=rewards.device).expand(order.shape[0])
    in_top_k = torch.arange(group_size, device=rewards.device)[None, :] < k[:, None]  # by rank
    return torch.zeros_like(in_top_k).scatter(1, order, in_top_k).view(-1)


def adaptive_k(difficulty: torch.Tensor, history: torch.Tensor, k: int, min_history: int) -> torch.Tensor:
    """GFPO Algorithm 2: retained k per prompt from the quartile of the history its difficulty falls in.

    difficulty: (N,) mean reward of each prompt's G completions (low = hard); history: every difficulty
    seen so far. Until the history holds `min_history` values every prompt keeps k. Then, with q25/q50/q75
    the quartiles of the history: below q25 k, below q50 k, below q75 ceil(3k/4), else ceil(k/2), never
    below 2 (the paper's 8, 8, 6, 4 at k = 8). Returns (N,) long.
    """
    if history.numel() < min_history:
        return torch.full(difficulty.shape, k, dtype=torch.long, device=difficulty.device)
    quartiles = torch.quantile(history.float(), torch.tensor([0.25, 0.5, 0.75], device=history.device))
    bucket = (difficulty[:, None] >= quartiles[None, :]).sum(dim=1)  # 0: below q25 (hardest) .. 3: q75 or more
    ks = torch.tensor([k, k, max(2, math.ceil(3 * k / 4)), max(2, math.ceil(k / 2))], device=difficulty.device)
    return ks[bucket]


def compute_advantages(rewards: torch.Tensor, keep: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """GFPO eq. 2: advantages over each prompt's retained set S only,
    A_i = (r_i - mean_S) / (std_S + eps) for i in S, population std as the paper writes it; A_i = 0 for
    the filtered-out completions. rewards, keep: (B,); returns (B,)."""
    grouped = rewards.view(-1, group_size)
    kept = keep.view(-1, group_size).to(grouped.dtype)
    size = kept.sum(dim=1, keepdim=True)
    mean = (grouped * kept).sum(dim=1, keepdim=True) / size
    std = (((grouped - mean) ** 2 * kept).sum(dim=1, keepdim=True) / size).sqrt()  # population (N), the paper's
    return (kept * (grouped - mean) / (std + eps)).view(-1)


def compute_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    beta: float,
    num_tokens,
):
    """GFPO objective, eq. 2: GRPO's clipped surrogate with the k3 KL of DeepSeekMath eq. 4, aggregated as a
    token-mean over the retained completions (paper footnote 1).

    logp, old_logp, ref_logp, mask: (B, T) over completion tokens; advantages: (B,); num_tokens: the token
    count of the whole minibatch these rows belong to (the token-mean's denominator).
    Returns the loss (a scalar) and a dict of detached metrics.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    if beta > 0:
        # k3 estimator of KL(pi || pi_ref), DeepSeekMath eq. 4; >= 0 per token
        log_ratio_ref = ref_logp - logp
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
        per_token = per_token + beta * kl
    # token-mean: sum_{i,t} l[i, t] / sum_i |o_i| over the minibatch's retained completions (GFPO eq. 2 and
    # footnote 1, DAPO eq. 8); num_tokens counts the whole minibatch, so micro-batch losses just add up
    loss = (per_token * mask).sum() / num_tokens

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
        log_ratio_old = old_logp - logp
        metrics = {
            "loss/policy": (per_token * mask).sum() / tokens,  # this micro-batch's own token-mean
            "policy/clip_frac": (clipped.float() * mask).sum() / tokens,
            # k3 between the sampling policy and the current one
            "policy/approx_kl": ((torch.exp(log_ratio_old) - log_ratio_old - 1) * mask).sum() / tokens,
        }
        if beta > 0:
            metrics["loss/kl"] = (kl * mask).sum() / tokens
    return loss, metrics


def compute_entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, num_tokens: Optional[torch.Tensor] = None):
    """Minus the token-mean entropy, the term ent_coef multiplies in the total loss (the paper trains
    with an entropy bonus of 0.001, ALGORITHMS.md). entropy, mask: (B, T); num_tokens as in compute_policy_loss.
    """
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)
    return -(entropy * mask).sum() / num_tokens


def accumulate_gradients(model, rollout, old_logp, ref_logp, advantages, minibatch, micro_batch_size, args):
    """Backward pass over one minibatch (row indices), `micro_batch_size` rows at a time.

    The accumulated gradient equals that of the whole minibatch at once: the token-mean's denominator is
    the minibatch's token count, so each micro-batch's loss is its share of the sum and needs no weight.
    """
    # the token-mean's denominator: this minibatch's token count, averaged over the processes under torchrun,
    # where FSDP averages the gradients: the gradient is then that of the global minibatch's token-mean
    num_tokens = common.all_reduce(rollout.completion_mask[minibatch].sum(), "mean")
    metrics = []
    # in rollout order, each prompt's rows side by side: the backbone runs a prompt once (completion_logprobs)
    for micro in minibatch.sort().values.split(micro_batch_size):
        # old_logp None: on-policy (main, step 3). The values are then the sampler's own, and the output
        # projection runs in the backward pass only (common.completion_logprobs); the ratio is exactly 1
        sampled = None if old_logp is not None else (rollout.logprobs[micro], rollout.entropy[micro])
        logp, entropy = common.completion_logprobs(
            model, rollout.input_ids[micro], rollout.attention_mask[micro], rollout.prompt_len,
            args.temperature, args.logprob_chunk_size, with_entropy=args.ent_coef > 0, values=sampled,
        )
        old_logp_micro = logp.detach() if old_logp is None else old_logp[micro]
        loss, micro_metrics = compute_policy_loss(
            logp, old_logp_micro, None if ref_logp is None else ref_logp[micro], advantages[micro],
            rollout.completion_mask[micro], args.clip_eps, args.beta, num_tokens,
        )
        if args.ent_coef > 0:
            loss = loss + args.ent_coef * compute_entropy_loss(entropy, rollout.completion_mask[micro], num_tokens)
        loss.backward()
        metrics.append(micro_metrics)
    return metrics


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
    ref_model = common.load_reference(model) if args.beta > 0 else None
    # torchrun: FSDP2 shards every model over the processes (common.shard_model); one process: unchanged
    model, ref_model = common.shard_model(model), common.shard_model(ref_model)
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
            {"skipped_steps": skipped_steps, "skipped_in_a_row": skipped_in_a_row, "history": history}, args.keep_last,
        )
        tqdm.write(f"saved {path}")

    history = torch.empty(0, device=device)  # GFPO Algorithm 2: the difficulties seen so far
    # resume: weights, optimizer states, the prompt stream's position and the RNG states (common.py)
    start_step, skipped_steps, skipped_in_a_row = 0, 0, 0
    if args.resume:
        start_step, extra = common.load_training_state(args.resume, SCRIPT, models, optimizers, prompts, args.save_dir)
        skipped_steps, skipped_in_a_row = extra["skipped_steps"], extra["skipped_in_a_row"]
        history = extra["history"].to(device)
        common.check(
            start_step < args.num_steps, f"--num-steps {args.num_steps}: the checkpoint is already at step {start_step}"
        )
    start_accuracy = run_eval(start_step)
    num_prompts = args.num_prompts // common.world_size()  # this process's share of each rollout batch
    batch_size = num_prompts * args.group_size
    minibatch_size = num_prompts * args.k // args.num_minibatches  # GFPO: minibatches of retained rows
    micro_batch_size = args.micro_batch_size or minibatch_size
    start_time = time.time()
    for step in tqdm(
        range(start_step + 1, args.num_steps + 1), initial=start_step, total=args.num_steps, desc=args.exp_name,
        file=sys.stdout,
    ):
        # 1. Rollout: G completions per prompt, contiguous
        t0 = time.time()
        rows = prompts.next(args.num_prompts)[rank * num_prompts : (rank + 1) * num_prompts]
        texts = [common.format_prompt(tokenizer, r["prompt"], task.use_chat_template) for r in rows]
        rollout = common.generate(
            model, tokenizer, texts, args.group_size, args.max_new_tokens, args.temperature, eos_ids
        )
        completions = common.decode_completions(tokenizer, rollout)
        time_generate = time.time() - t0

        # 2. Score, retain k of G per prompt (GFPO Algorithms 1-2), advantages over the retained set
        t0 = time.time()
        rewards = common.score(task, completions, rows, args.group_size).to(device)
        k = torch.full((num_prompts,), args.k, device=device)
        if args.adaptive_k:  # Algorithm 2: difficulty = mean reward of a prompt's G completions
            difficulty = rewards.view(-1, args.group_size).mean(dim=1)
            history = torch.cat([history, difficulty[difficulty.isfinite()]])  # a NaN reward must not poison it
            k = adaptive_k(difficulty, history, args.k, min_history=4 * args.num_prompts)
        keep = select_retained(rewards, rollout.lengths, args.group_size, k, args.metric)
        advantages = compute_advantages(rewards, keep, args.group_size, args.adv_eps)
        retained_zero_std = (advantages.view(-1, args.group_size) == 0).all(dim=1)
        # GFPO eq. 2: filtered-out completions have zero advantage: drop them, no forward or backward on them
        retained = keep.nonzero().squeeze(1)
        sampled = rollout
        rollout = common.Rollout(**{f: v[retained] if torch.is_tensor(v) else v for f, v in vars(rollout).items()})
        advantages = advantages[retained]
        mask = rollout.completion_mask

        # 3. Log-probs of the sampling policy (old) and of the reference, once per rollout batch.
        # With one epoch and one minibatch the policy is still the sampling one when the loss is computed: the
        # old log-probs are then the sampler's (Rollout.logprobs), and their pass is skipped
        with torch.no_grad():
            old_logp = None
            if args.update_epochs > 1 or args.num_minibatches > 1:
                old_logp, _ = common.completion_logprobs(
                    model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, args.temperature,
                    args.logprob_chunk_size,
                )
            ref_logp = None
            if ref_model is not None:
                ref_logp, _ = common.completion_logprobs(
                    ref_model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, args.temperature,
                    args.logprob_chunk_size,
                )

        # 4. update_epochs x num_minibatches optimizer steps, each accumulated over micro-batches; a
        # step whose loss or gradient norm is not finite is skipped (one host sync per optimizer step to know)
        step_metrics, step_skipped = [], 0
        for epoch in range(args.update_epochs):
            order = torch.randperm(len(retained), device=device)
            for minibatch in order.tensor_split(args.num_minibatches):  # even split: --adaptive-k varies the rows
                minibatch_metrics = accumulate_gradients(
                    model, rollout, old_logp, ref_logp, advantages, minibatch, micro_batch_size, args
                )
                step_metrics += minibatch_metrics
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                losses = [m["loss/policy"] for m in minibatch_metrics]
                if common.all_finite(grad_norm, *losses):
                    optimizer.step()
                else:  # a NaN or inf loss or gradient norm: skip this optimizer step
                    step_skipped += 1
                # freed now, not before the next backward: generation and evaluation do without them
                optimizer.zero_grad(set_to_none=True)
        skipped_steps += step_skipped
        time_train = time.time() - t0

        # 5. Logging: one host sync per step
        tokens = mask.sum()
        logged = {k: torch.stack([m[k] for m in step_metrics]).mean() for k in step_metrics[0]}
        logged.update({
            "reward/mean": rewards.mean(),
            "reward/std": rewards.std(),
            "completion/mean_length": sampled.lengths.float().mean(),
            "completion/truncated_frac": sampled.truncated.float().mean(),
            "policy/entropy": (rollout.entropy * mask).sum() / tokens,
            "optim/grad_norm": grad_norm,
            "groups/zero_std_frac": (rewards.view(-1, args.group_size).std(dim=1) == 0).float().mean(),
            "gfpo/retained_zero_std_frac": retained_zero_std.float().mean(),
            "gfpo/retained_k": k.float().mean(),
            "gfpo/retained_mean_length": rollout.lengths.float().mean(),
            "gfpo/all_mean_length": sampled.lengths.float().mean(),
        })
        logged = {k: float(v) for k, v in common.mean_over_processes(logged).items()}
        logged.update({
            "optim/lr": optimizer.param_groups[0]["lr"],
            "optim/skipped_steps": skipped_steps,  # optimizer steps skipped so far
            "perf/tokens_per_sec": logged["completion/mean_length"] * batch_size / (time_generate + time_train),
            "perf/time_generate": time_generate,
            "perf/time_train": time_train,
        })
        tqdm.write(
            f"step {step}: reward {logged['reward/mean']:.3f}  loss {logged['loss/policy']:+.4f}"
            f"  kl {logged.get('loss/kl', 0.0):.4f}  len {logged['completion/mean_length']:.1f}"
            f"  grad {logged['optim/grad_norm']:.3f}  {logged['perf/tokens_per_sec']:.0f} tok/s"
            f"  k {logged['gfpo/retained_k']:.2f}"  # GFPO: mean retained k
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
