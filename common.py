"""What the algorithm scripts share: loading, several processes, checkpoints, rollout, log-probs, tasks, rewards.

No loss or advantage code lives here: that is each script's own business.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parent
TINY_MODEL = ROOT / "assets" / "tiny-qwen2"


class UserError(Exception):
    """Bad input, or a run that cannot go on: reported as one line, exit code 2, no traceback."""


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check(condition: bool, message: str):
    if not condition:
        raise UserError(message)


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def get_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one (under torchrun, the LOCAL_RANK-th), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the forward and backward passes (`auto`: bf16 on CUDA, fp32 elsewhere). Weights, AdamW states,
    log-probs, losses and advantages are fp32 whatever it is."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """`tiny` is the model shipped in assets/; anything else is a hub id or a local folder."""
    return str(TINY_MODEL) if name == "tiny" else name


def is_tiny(name: str) -> bool:
    return Path(resolve_model_path(name)).resolve() == TINY_MODEL


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: no tokenizer found as a local folder or hub id ({_first_line(e)})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad == EOS is fine: masks come from positions
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str, device, dtype=torch.float32, attn_implementation="sdpa", gradient_checkpointing=False,
               trainable=True):
    """The causal LM `name` with fp32 weights, ready to train (or frozen, for a reference model), placed by `place`."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, attn_implementation=attn_implementation)
    try:
        output_layer(model)
    except UserError as e:
        raise UserError(f"--model {name}: {e}")
    return place(prepare(model, gradient_checkpointing, trainable), device, dtype)


def load_critic(name: str, device, dtype=torch.float32, attn_implementation="sdpa", gradient_checkpointing=False):
    """PPO's value model: the backbone of `name` with a scalar head giving one value per token, zero-initialised so
    that every value starts at 0 (a neutral start: no return is known before training)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), num_labels=1, classifier_dropout=0.0)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: no config found as a local folder or hub id ({_first_line(e)})")
    critic = _from_pretrained(AutoModelForTokenClassification, name, config=config, attn_implementation=attn_implementation)
    head = critic.score if hasattr(critic, "score") else critic.classifier  # decoder LMs name it `score`
    torch.nn.init.zeros_(head.weight)
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    return place(prepare(critic, gradient_checkpointing, trainable=True), device, dtype)


def _from_pretrained(cls, name: str, **kwargs):
    """On the CPU, in fp32: each process loads there, and `place` moves only its shard to the accelerator."""
    try:
        return cls.from_pretrained(resolve_model_path(name), dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: no model found as a local folder or hub id ({_first_line(e)})")


def prepare(model, gradient_checkpointing: bool, trainable: bool = True):
    """Training mode with every dropout at 0 (as TRL's disable_dropout): the log-probs of an update are those of
    the policy that sampled. transformers checkpoints activations in training mode only. Frozen: eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if gradient_checkpointing and trainable:  # transformers 5 renamed gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train(trainable)
    return model.requires_grad_(trainable)


def output_layer(model):
    """The LM head, checked: a plain Linear whose output the model takes as its logits (log-probs here multiply by
    its weight directly, so a softcap or scale applied after it would be lost)."""
    lm_head = model.get_output_embeddings()
    check(isinstance(lm_head, torch.nn.Linear),
          f"{type(model).__name__}: output layer {type(lm_head).__name__}; only a plain torch.nn.Linear is supported")
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(model.config, name, None)
        check(value in (None, 1, 1.0), f"{type(model).__name__}: {name}={value} changes the logits after the "
              "output layer, which this project does not support")
    return lm_head


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's generation EOS ids."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# ----------------------------------------------------------------------------------------------
# Placement and several processes (torchrun): FSDP2 as torchtitan uses it
# ----------------------------------------------------------------------------------------------


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def init_distributed(device: torch.device) -> int:
    """Under torchrun, join the process group (nccl on CUDA, gloo on the CPU) and silence stdout on every rank
    but 0. Returns this process's rank (0 without torchrun)."""
    if "RANK" not in os.environ:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank()


def finish_distributed():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def place(model, device: torch.device, dtype: torch.dtype):
    """One process in fp32: the model as it is, moved to `device`. Otherwise FSDP2's `fully_shard` on every decoder
    layer, then on the root (embeddings, final norm, LM head): each process keeps 1/world of every fp32 weight,
    gradient and AdamW state, a forward gathers one layer at a time in `dtype`, and gradients are reduced in fp32.
    With one process in bf16 that is a process group of one: the same code path as on eight GPUs."""
    if world_size() == 1 and dtype == torch.float32:
        return model.to(device)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layers = set(getattr(model, "_no_split_modules", None) or [])
    check(bool(layers), f"{type(model).__name__}: no _no_split_modules, so no decoder layers to shard")
    for module in model.modules():  # fully_shard moves one module's shard at a time to the device
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # completion_logprobs calls the backbone and the LM head itself: FSDP hooks it like model.forward
    model.fsdp_completion_logprobs = _completion_logprobs.__get__(model)
    register_fsdp_forward_method(model, "fsdp_completion_logprobs")
    return model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor (FSDP2's clip_grad_norm_ returns a DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` summed (`sum`), averaged (`mean`) or minimised (`min`) over the processes; a new tensor."""
    tensor = _local(tensor).clone()
    if world_size() == 1:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return tensor / world_size() if op == "mean" else tensor


def min_over_processes(value: int, device: torch.device) -> int:
    return int(all_reduce(torch.tensor(value, device=device), "min"))


def mean_over_processes(metrics: dict) -> dict:
    """Each metric averaged over the processes, in one all-reduce (rank 0 logs them)."""
    if world_size() == 1:
        return metrics
    names = list(metrics)
    return dict(zip(names, all_reduce(torch.stack([_local(metrics[k]).float() for k in names]), "mean")))


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every value is finite, on every process: one host sync for all of them."""
    finite = torch.stack([torch.isfinite(_local(t)).all() for t in tensors]).all()
    return bool(all_reduce(finite.float(), "min"))


# ----------------------------------------------------------------------------------------------
# Checkpoints and resuming: nothing already computed is lost when a run dies
# ----------------------------------------------------------------------------------------------

TRAINING_STATE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(save_dir: str | Path) -> list[Path]:
    """The complete checkpoints `step_N` (those holding a training state) in `save_dir`, oldest first."""
    found = [p for p in Path(save_dir).glob("step_*") if p.name[5:].isdigit() and (p / TRAINING_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_training_state(save_dir, step: int, script: str, tokenizer, models: dict, optimizers: dict, prompts,
                        extra=None, keep_last: int = 2) -> Path:
    """Write `save_dir/step_{step}`: every model in save_pretrained format (`policy` at the top, any other in a
    subfolder of its name), the tokenizer, and training_state.pt (script, step, optimizer states, every process's
    RNG states, the prompt stream's position, `extra`). It is written to a temporary folder renamed into place at
    the end, so a kill during a save leaves the previous checkpoints as they were; then the newest `keep_last`
    are kept (0: all). Weights that are not finite are never written. Every process calls this; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    local_weights = [getattr(p, "to_local", lambda p=p: p)() for m in models.values() for p in m.parameters()]
    check(all_finite(*local_weights), f"not saving step {step}: the weights hold NaN or inf")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered whole on rank 0
    model_states = {name: get_model_state_dict(m, options=options) if is_sharded(m) else None
                    for name, m in models.items()}
    optimizer_states = {name: get_optimizer_state_dict(models[name], opt, options=options)
                        if is_sharded(models[name]) else opt.state_dict() for name, opt in optimizers.items()}
    rng = [None] * world_size()
    if world_size() > 1:
        import torch.distributed as dist

        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    path = Path(save_dir) / f"step_{step}"
    if rank() == 0:
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, model in models.items():
            model.save_pretrained(tmp if name == "policy" else tmp / name, state_dict=model_states[name])
        tokenizer.save_pretrained(tmp)
        state = {"script": script, "step": step, "world_size": world_size(), "optimizers": optimizer_states,
                 "rng": rng, "prompts": prompts.state_dict(), "extra": extra or {}}
        torch.save(state, tmp / TRAINING_STATE)
        if path.exists():  # the same step saved again (a resumed run): swap, then drop the old one
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoints(save_dir)[:-keep_last] if keep_last else []:
            shutil.rmtree(stale)
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()  # the checkpoint is on disk before any process goes on
    return path


def find_checkpoint(resume: str) -> Path:
    """`resume` is a checkpoint folder, or a --save-dir whose newest complete checkpoint is taken."""
    path = Path(resume)
    check(path.is_dir(), f"--resume {resume}: no such folder")
    if (path / TRAINING_STATE).is_file():
        return path
    found = checkpoints(path)
    check(bool(found), f"--resume {resume}: not a checkpoint (no {TRAINING_STATE}) and holds no step_N checkpoint")
    return found[-1]


def load_training_state(resume: str, script: str, models: dict, optimizers: dict, prompts, save_dir=None):
    """Restore what save_training_state wrote into the live objects: weights, optimizer states, the prompt stream,
    and the RNG states last, so the next step draws what it would have drawn in an unbroken run. Rows of
    metrics.jsonl logged after the checkpoint's step are dropped (they will be logged again). Every process loads;
    the number of processes must be the one that saved. Returns (step, extra)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = find_checkpoint(resume)
    try:
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"--resume {path}: cannot read {TRAINING_STATE} ({_first_line(e)})")
    saved_by = state.get("script") if isinstance(state, dict) else "something else"
    check(saved_by == script, f"--resume {path}: a checkpoint of {saved_by}, not of {script}")
    check(state["world_size"] == world_size(),
          f"--resume {path}: saved by {state['world_size']} process(es), resumed with {world_size()}: use as many")
    try:
        for name, model in models.items():
            # from_pretrained, then copy: it resolves tied weights and sharded files like any hub model
            weights = type(model).from_pretrained(path if name == "policy" else path / name, dtype=torch.float32)
            if is_sharded(model):  # every process takes its shard of the full state dicts
                options = StateDictOptions(full_state_dict=True)
                set_model_state_dict(model, weights.state_dict(), options=options)
                set_optimizer_state_dict(model, optimizers[name], state["optimizers"][name], options=options)
            else:
                model.load_state_dict(weights.state_dict())
                optimizers[name].load_state_dict(state["optimizers"][name])
            del weights
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"--resume {path}: does not fit this model and these flags ({_first_line(e)})")
    prompts.load_state_dict(state["prompts"])
    metrics = Path(save_dir or path.parent) / METRICS_FILE
    if rank() == 0 and metrics.is_file():
        rows = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= state["step"]]
        metrics.write_text("".join(row + "\n" for row in rows))
    set_rng_state(state["rng"][rank()])
    print(f"resumed from {path} at step {state['step']}")
    return state["step"], state["extra"]


def log_metrics(save_dir: Optional[str], step: int, metrics: dict, track: bool = False):
    """One JSON line per step in `save_dir`/metrics.jsonl, and Weights and Biases with --track (rank 0 only)."""
    if track:
        import wandb

        wandb.log(metrics, step=step)
    if save_dir and rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        with open(Path(save_dir) / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded prompts
    prompt_mask: torch.Tensor  # (B, P) 0 on left padding
    completion_ids: torch.Tensor  # (B, T) T = the longest completion; pad after each EOS
    completion_mask: torch.Tensor  # (B, T) float, 1 up to and including the first EOS
    lengths: torch.Tensor  # (B,) long, tokens per completion (EOS counted)
    truncated: torch.Tensor  # (B,) bool, no EOS within max_new_tokens
    entropy: torch.Tensor  # (B, T) entropy of each token's sampling distribution, 0 past the completion

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, torch.ones_like(self.completion_ids)], dim=1)

    def select(self, rows: torch.Tensor) -> Rollout:
        """These rows, without the prompt columns that are padding in all of them, cut to their longest completion."""
        prompt_mask = self.prompt_mask[rows]
        start, width = torch.stack([prompt_mask.any(dim=0).int().argmax(), self.lengths[rows].max()]).tolist()
        return Rollout(self.prompt_ids[rows, start:], prompt_mask[:, start:], self.completion_ids[rows, :width],
                       self.completion_mask[rows, :width], self.lengths[rows], self.truncated[rows],
                       self.entropy[rows, :width])

    @staticmethod
    def cat(rollouts: list[Rollout], pad_id: int) -> Rollout:
        """Rollouts stacked (DAPO's generation rounds): prompts left-padded and completions right-padded to the widest."""
        P, T = max(r.prompt_len for r in rollouts), max(r.completion_ids.shape[1] for r in rollouts)

        def pad(x, width, value=0, left=False):
            return F.pad(x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]), value=value)

        return Rollout(
            torch.cat([pad(r.prompt_ids, P, pad_id, left=True) for r in rollouts]),
            torch.cat([pad(r.prompt_mask, P, left=True) for r in rollouts]),
            torch.cat([pad(r.completion_ids, T, pad_id) for r in rollouts]),
            torch.cat([pad(r.completion_mask, T) for r in rollouts]),
            torch.cat([r.lengths for r in rollouts]),
            torch.cat([r.truncated for r in rollouts]),
            torch.cat([pad(r.entropy, T) for r in rollouts]),
        )


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]):
    """Mask from positions: 1 up to and including the first EOS, all ones if there is none. Never compares with the
    pad id, so pad == EOS still trains the EOS token. Returns (mask float (B, T), lengths (B,), truncated (B,))."""
    B, T = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    truncated = ~is_eos.any(dim=1)
    first_eos = torch.where(truncated, T - 1, is_eos.int().argmax(dim=1))  # argmax finds the first True
    mask = (torch.arange(T, device=completion_ids.device)[None, :] <= first_eos[:, None]).float()
    return mask, first_eos + 1, truncated


def format_prompt(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int, temperature: float,
             eos_ids: list[int], greedy: bool = False) -> Rollout:
    """Sample `group_size` completions per prompt, each prompt's completions contiguous (row i*G + j).

    A plain decoding loop over the KV cache: each token is a sample of softmax(logits / T) (`greedy`: the argmax),
    with none of the model's top-k, top-p or repetition penalty, so the log-probs computed later are those of the
    distribution that sampled. It stops once every row has ended (under torchrun, every process's rows).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    B = len(prompts) * group_size
    positions = (enc.attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding does not shift them
    cache = DynamicCache(config=model.config)  # filled in place by every forward
    forward = functools.partial(model, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    eos, ended = torch.tensor(eos_ids, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    tokens, entropies = [], []
    was_training = model.training
    model.eval()
    if is_sharded(model):  # gather each layer once for the whole rollout, not once per token
        model.set_reshard_after_forward(False)
    try:
        # the G completions of a prompt share it: it runs through the model once, then its KV cache is repeated
        logits = forward(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=positions).logits
        cache.batch_repeat_interleave(group_size)
        logits = logits[:, -1].float().repeat_interleave(group_size, dim=0)
        mask = enc.attention_mask.repeat_interleave(group_size, dim=0)
        position = positions[:, -1:].repeat_interleave(group_size, dim=0)
        for _ in range(max_new_tokens):
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                log_probs = torch.log_softmax(logits / temperature, dim=-1)
                entropies.append(-(log_probs.exp() * log_probs).sum(dim=-1))
                token = torch.multinomial(log_probs.exp(), 1).squeeze(1)
            token = token.masked_fill(ended, tokenizer.pad_token_id)
            tokens.append(token)
            ended |= torch.isin(token, eos)
            if min_over_processes(int(ended.all()), device):  # a host sync per token; processes stop together
                break
            mask, position = torch.cat([mask, mask.new_ones(B, 1)], dim=1), position + 1
            logits = forward(input_ids=token[:, None], attention_mask=mask, position_ids=position).logits[:, -1].float()
    finally:
        if is_sharded(model):  # back to resharding the layers after each forward, the root kept whole
            model.set_reshard_after_forward(True)
            model.set_reshard_after_forward(False, recurse=False)
            for module in model.modules():
                if is_sharded(module):
                    module.reshard()
        model.train(was_training)
    completion_ids = torch.stack(tokens, dim=1)
    mask, lengths, truncated = completion_mask(completion_ids, eos_ids)
    entropy = torch.stack(entropies, dim=1) * mask if entropies else torch.zeros_like(mask)
    rollout = Rollout(enc.input_ids.repeat_interleave(group_size, dim=0), enc.attention_mask.repeat_interleave(
        group_size, dim=0), completion_ids, mask, lengths, truncated, entropy)
    return rollout.select(torch.arange(B, device=device))  # as wide as this process's longest completion


def completion_logprobs(model, rollout: Rollout, temperature: float, with_entropy: bool = False,
                        chunk_size: int = 512):
    """Log-prob of every completion token under `model` at the sampling temperature, (B, T) in fp32, and with
    `with_entropy` the entropy of softmax(logits / temperature) at each token (else None).

    The backbone runs once; the LM head runs on `chunk_size` completion tokens at a time, each chunk under
    activation checkpointing, so the (B, T, vocab) fp32 logits never exist at once, in the forward or backward.
    """
    forward = getattr(model, "fsdp_completion_logprobs", None) or functools.partial(_completion_logprobs, model)
    return forward(rollout.input_ids, rollout.attention_mask, rollout.prompt_len, temperature, with_entropy, chunk_size)


def _completion_logprobs(model, input_ids, attention_mask, prompt_len, temperature, with_entropy, chunk_size):
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # the positions `generate` used
    # position P - 1 + t predicts completion token t; the last position predicts nothing
    hidden = model.base_model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                              position_ids=positions[:, :-1], use_cache=False).last_hidden_state[:, prompt_len - 1 :]
    targets = input_ids[:, prompt_len:]
    lm_head = output_layer(model)
    B, T, H = hidden.shape
    chunks = zip(hidden.reshape(B * T, H).split(chunk_size), targets.reshape(B * T).split(chunk_size))
    args = (lm_head.weight, lm_head.bias, temperature, with_entropy)
    if torch.is_grad_enabled():  # the backward recomputes each chunk's logits rather than keeping them
        outs = [checkpoint(_token_logprobs, h, y, *args, use_reentrant=False) for h, y in chunks]
    else:
        outs = [_token_logprobs(h, y, *args) for h, y in chunks]
    # new tensors, not views: FSDP2 hooks the outputs of a forward for the backward pass
    logp = torch.cat([out[0] for out in outs]).view(B, T).clone()
    return logp, torch.cat([out[1] for out in outs]).view(B, T).clone() if with_entropy else None


def _token_logprobs(hidden, targets, weight, bias, temperature, with_entropy):
    """log softmax(logits / T)[target] and the entropy, for one chunk of tokens, in fp32."""
    log_probs = torch.log_softmax(F.linear(hidden, weight, bias).float() / temperature, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1) if with_entropy else None
    return log_probs.gather(1, targets[:, None]).squeeze(1), entropy


def per_micro_batch(fn: Callable[[Rollout], torch.Tensor], rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
    """fn on `micro_batch_size` rows at a time (each cut by Rollout.select), right-padded with 0 to the rollout's
    width and stacked: (B, T). No forward sees more rows than that."""
    T = rollout.completion_ids.shape[1]
    rows = torch.arange(len(rollout.lengths), device=rollout.lengths.device).split(micro_batch_size)
    return torch.cat([F.pad(out, (0, T - out.shape[1])) for out in (fn(rollout.select(r)) for r in rows)])


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """completion_logprobs of a whole rollout, without gradients, `micro_batch_size` rows per forward: (B, T)."""
    return per_micro_batch(lambda part: completion_logprobs(model, part, temperature)[0], rollout, micro_batch_size)


# ----------------------------------------------------------------------------------------------
# Rewards: parse model output safely; garbage or hostile output scores 0, never raises
# ----------------------------------------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 10**9


def extract_answer_tag(text: str) -> Optional[str]:
    """Content of the last <answer>...</answer>, or None."""
    found = ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def parse_number(text: str) -> Optional[Fraction]:
    """An exact number from text like '1,234', '-5', '3.50', '$12', '-$5'; None if it is not one number."""
    text = re.sub(r"^(-?)\$", r"\1", text.strip().replace(",", "")).rstrip(".").strip()
    if len(text) > 40 or not re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        return None
    return Fraction(text)


def numeric_answer(text: str) -> Optional[Fraction]:
    """The number in the answer tag; if the tag holds more than a number, its last word that is a number
    ("The answer is 18." gives 18; "1/2", ".5" or "1e3" give nothing rather than a wrong part of them).

    The last-number fallback looks only inside the tag: numbers elsewhere in the reasoning never count.
    """
    inside = extract_answer_tag(text)
    if inside is None:
        return None
    value = parse_number(inside)
    if value is None:
        for word in reversed(inside.split()):
            value = parse_number(word.strip(",;:!?()"))
            if value is not None:
                break
    return value


def safe_eval_arithmetic(expression: str) -> Optional[tuple[Fraction, list[int]]]:
    """Evaluate + - * / over integer literals exactly, without `eval`.

    Returns (value, the integer literals used) or None for anything else: names, calls, attributes,
    powers, literals or intermediate values beyond 1e9, division by zero, over-long input.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    literals: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if abs(node.value) > MAX_ABS_VALUE:
                raise ValueError("literal too large")
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                value = left + right
            elif isinstance(node.op, ast.Sub):
                value = left - right
            elif isinstance(node.op, ast.Mult):
                value = left * right
            else:
                if right == 0:
                    raise ZeroDivisionError
                value = left / right
            if abs(value) > MAX_ABS_VALUE:
                raise ValueError("value too large")
            return value
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        return walk(tree), literals
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def arithmetic_reward(completion: str, answer: int) -> float:
    """1 if the completion is exactly the integer answer (surrounding spaces ignored), else 0."""
    text = completion.strip()
    return float(len(text) <= 20 and re.fullmatch(r"-?\d+", text) is not None and int(text) == answer)


def countdown_reward(completion: str, answer: dict) -> float:
    """1 if the equation in the answer tag uses each given number exactly once and equals the target."""
    inside = extract_answer_tag(completion)
    if inside is None:
        return 0.0
    inside = inside.split("=")[0]  # accept "a + b = target"
    result = safe_eval_arithmetic(inside)
    if result is None:
        return 0.0
    value, used = result
    return float(sorted(used) == sorted(answer["numbers"]) and value == answer["target"])


def numeric_reward(completion: str, answer: str) -> float:
    """1 if the number in the answer tag equals the reference number (commas, '$' ignored), else 0."""
    expected = parse_number(str(answer))
    got = numeric_answer(completion)
    return float(expected is not None and got is not None and got == expected)


def exact_reward(completion: str, answer: str) -> float:
    """For jsonl rows: numeric comparison when the reference is a number, else exact text in the tag."""
    if parse_number(str(answer)) is not None:
        return numeric_reward(completion, answer)
    inside = extract_answer_tag(completion)
    return float(inside is not None and inside.strip() == str(answer).strip())


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    train: list[dict]  # rows with "prompt" and "answer"
    eval: list[dict]  # fixed held-out rows, never trained on
    reward_fn: Callable[[str, object], float]
    use_chat_template: bool


class PromptStream:
    """Endless shuffled passes over the training rows; `position` says how far it has read."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.rng, self.order, self.position = rows, random.Random(seed), [], 0

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict):
        self.rng.setstate(state["rng"])
        self.order, self.position = list(state["order"]), state["position"]

    def next(self, n: int) -> list[dict]:
        batch = []
        while len(batch) < n:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            batch.append(self.rows[self.order.pop()])
            self.position += 1
        return batch


ARITHMETIC_EVAL_SIZE = 20


def arithmetic_task() -> Task:
    """Single-digit addition `a+b=` -> `a+b`; 20 of the 100 pairs are held out (fixed, seed 0)."""
    rows = [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(10) for b in range(10)]
    random.Random(0).shuffle(rows)
    return Task("arithmetic", rows[ARITHMETIC_EVAL_SIZE:], rows[:ARITHMETIC_EVAL_SIZE], arithmetic_reward, False)


COUNTDOWN_PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number must be used exactly once. Think step by step, then give the "
    "equation in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


def make_countdown(rng: random.Random) -> dict:
    """A TinyZero-style puzzle: 3 or 4 numbers in 1..99 combined by a random expression with an
    integer target in 1..999 (so a solution is known to exist)."""
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice([3, 4]))]
        order = numbers[:]
        rng.shuffle(order)
        value = Fraction(order[0])
        for n in order[1:]:
            value = rng.choice([value + n, value - n, value * n, value / n])
        if value.denominator == 1 and 1 <= value <= 999:
            target = int(value)
            prompt = COUNTDOWN_PROMPT.format(numbers=numbers, target=target)
            return {"prompt": prompt, "answer": {"numbers": numbers, "target": target}}


def countdown_task(num_train: int = 20000, num_eval: int = 200) -> Task:
    rng = random.Random(0)
    eval_rows = [make_countdown(rng) for _ in range(num_eval)]
    held_out = {row["prompt"] for row in eval_rows}
    train = [row for row in (make_countdown(rng) for _ in range(num_train)) if row["prompt"] not in held_out]
    return Task("countdown", train, eval_rows, countdown_reward, True)


GSM8K_PROMPT = "{question}\nSolve it step by step, then give the final number in <answer> </answer> tags."


def gsm8k_task(path: Optional[str] = None, num_eval: int = 500) -> Task:
    """GSM8K: openai/gsm8k (main) through `datasets`, the train split for training and the first `num_eval` test
    rows held out; or, from `path`, a jsonl file of rows in GSM8K's own format ({"question", "answer"}), 10% held
    out. The reference is the number after '####'."""
    def row(r):
        return {"prompt": GSM8K_PROMPT.format(question=r["question"]), "answer": gsm8k_reference(r["answer"])}

    if path is not None:
        train, held_out = split_rows([row(r) for r in read_jsonl(path, "gsm8k", ("question", "answer"))])
        return Task(f"gsm8k:{path}", train, held_out, numeric_reward, True)
    try:
        from datasets import load_dataset

        data = load_dataset("openai/gsm8k", "main")
    except Exception as e:  # no network, no cache: say so in one line
        raise UserError(f"--task gsm8k: could not load openai/gsm8k with `datasets` ({_first_line(e)})")
    return Task("gsm8k", [row(r) for r in data["train"]], [row(r) for r in data["test"]][:num_eval], numeric_reward,
                True)


def gsm8k_reference(solution: str) -> str:
    """The reference answer is the text after '####', with thousands separators removed."""
    return solution.split("####")[-1].strip().replace(",", "")


def read_jsonl(path: str, task: str, keys: tuple[str, ...]) -> list[dict]:
    """The rows of a jsonl file, each a dict holding `keys` (blank lines skipped); bad input is a UserError."""
    check(Path(path).is_file(), f"--task {task}:{path}: file not found")
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except ValueError:  # bad UTF-8, bad JSON, or an integer too long to convert
                raise UserError(f"--task {task}:{path}: line {number} is not valid JSON in UTF-8")
            if row is not None:
                check(isinstance(row, dict) and all(k in row for k in keys),
                      f"--task {task}:{path}: line {number} needs both {' and '.join(repr(k) for k in keys)}")
                rows.append(row)
    check(len(rows) >= 2, f"--task {task}:{path}: needs at least 2 rows (one is held out), found {len(rows)}")
    return rows


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out): a fixed 10% of the rows (at least one) is held out."""
    rows = rows[:]
    random.Random(0).shuffle(rows)
    num_eval = max(1, len(rows) // 10)
    return rows[num_eval:], rows[:num_eval]


def jsonl_task(path: str) -> Task:
    """Your own rows {"prompt": ..., "answer": ...}; a fixed 10% (at least one row) is held out."""
    rows = [{"prompt": str(r["prompt"]), "answer": str(r["answer"])} for r in read_jsonl(path, "jsonl", ("prompt", "answer"))]
    train, held_out = split_rows(rows)
    return Task(f"jsonl:{path}", train, held_out, exact_reward, True)


TASKS = "arithmetic, countdown, gsm8k, gsm8k:PATH, jsonl:PATH"


def load_task(name: str) -> Task:
    if name == "arithmetic":
        return arithmetic_task()
    if name == "countdown":
        return countdown_task()
    if name == "gsm8k" or name.startswith("gsm8k:"):
        return gsm8k_task(name[len("gsm8k:") :] or None)
    if name.startswith("jsonl:"):
        return jsonl_task(name[len("jsonl:") :])
    raise UserError(f"--task {name}: unknown task; choose one of {TASKS}")


def score(task: Task, completions: list[str], rows: list[dict], group_size: int) -> torch.Tensor:
    """Reward of each completion; row i*G + j answers prompt i."""
    return torch.tensor(
        [task.reward_fn(text, rows[i // group_size]["answer"]) for i, text in enumerate(completions)],
        dtype=torch.float32,
    )


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    ids = (rollout.completion_ids * rollout.completion_mask.long()).tolist()
    lengths = rollout.lengths.tolist()
    return tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True)


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, max_new_tokens: int, eos_ids: list[int], batch_size: Optional[int] = None):
    """Greedy accuracy on the fixed held-out rows, `batch_size` prompts per generation (None: all at once).
    Returns (accuracy, [(prompt, completion, reward)]). Greedy decoding draws no random numbers, so evaluating never
    changes what training samples. Under torchrun each process evaluates an equal share (padded with rows that do
    not count) and the accuracy is summed over processes; the samples are this process's."""
    per_process = math.ceil(len(task.eval) / world_size())
    rows = task.eval[rank() * per_process : (rank() + 1) * per_process]
    counts = torch.tensor([1.0] * len(rows) + [0.0] * (per_process - len(rows)))
    rows = rows + [task.eval[0]] * (per_process - len(rows))
    rewards, samples = [], []
    for start in range(0, len(rows), batch_size or len(rows)):
        batch = rows[start : start + (batch_size or len(rows))]
        prompts = [format_prompt(tokenizer, r["prompt"], task.use_chat_template) for r in batch]
        completions = decode_completions(tokenizer, generate(model, tokenizer, prompts, 1, max_new_tokens, 1.0,
                                                             eos_ids, greedy=True))
        rewards.append(score(task, completions, batch, 1))
        samples += [(r["prompt"], c, float(x)) for r, c, x in zip(batch, completions, rewards[-1])]
    correct = (torch.cat(rewards).eq(1.0).float() * counts).sum()
    accuracy = all_reduce(correct.to(next(model.parameters()).device), "sum").item() / len(task.eval)
    return accuracy, samples[: int(counts.sum())]
