"""Shared plumbing for the algorithm scripts: loading, rollout, log-probs, tasks, rewards, evaluation.

No loss or advantage code lives here: that is each script's own business.
"""

from __future__ import annotations

import ast
import functools
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

ROOT = Path(__file__).resolve().parent
TINY_MODEL = ROOT / "assets" / "tiny-qwen2"


class UserError(Exception):
    """Bad input from the user, or a run that cannot go on: reported as one line, exit code 2, no traceback."""


def fail(message: str):
    """Print a one-line error and exit 2. Scripts call this for user errors only."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check(condition: bool, message: str):
    if not condition:
        raise UserError(message)


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def get_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one (under torchrun, the LOCAL_RANK-th), else the CPU. On the CPU, freed
    memory is kept for reuse (`keep_freed_cpu_memory`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if device.type == "cpu":
        keep_freed_cpu_memory()
    return device


MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for this setting on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_cpu_memory(libc_name: str = "libc.so.6"):
    """Training on the CPU allocates and frees the same activation-sized blocks every step. By default glibc
    serves blocks above its mmap threshold (128 KiB at start, raised as blocks are freed) with fresh pages from
    the operating system and hands them back on free, so the next step page-faults them in again: on the tiny
    benchmark that was half the step (0.12-0.2 s vs 0.08-0.09 s, README). Here blocks up to 32 MiB come from
    the heap, and up to 1 GiB of free heap is kept for reuse rather than returned; larger blocks are mapped as
    before. The cost is the kept heap (the qwen-shape benchmark's peak moved from 3.22-3.27 to 3.27-3.37 GiB),
    which `return_freed_cpu_memory` hands back where the step's peak would otherwise include it.
    This plays the role of PyTorch's caching allocator on CUDA; PyTorch's performance tuning guide recommends
    jemalloc or tcmalloc on the CPU for the same reason. Leaves the allocator alone when the environment
    already sets it (MALLOC_*_, GLIBC_TUNABLES), and on systems without glibc (macOS, musl), where there is
    no mallopt to call."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        raise RuntimeError("glibc mallopt refused the mmap or trim threshold")


def return_freed_cpu_memory(libc_name: str = "libc.so.6"):
    """Hand the free pages of glibc's heap back to the operating system (malloc_trim). keep_freed_cpu_memory has
    glibc keep up to 1 GiB of freed heap, but a block of 32 MiB or more is mapped fresh rather than cut from it:
    where such a block follows a large free, both would be resident at once. No-op without glibc."""
    import ctypes

    try:
        malloc_trim = ctypes.CDLL(libc_name).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)


def autocast(device: torch.device):
    """bf16 compute over fp32 master weights on CUDA; plain fp32 on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T (+ bias). On the CPU in fp32 through oneDNN's matmul (the op torch.compile uses for linear
    layers), which on this project's AMD machine runs the output projection's shapes at 2-2.5x the rate of the
    default BLAS path (MKL): same fp32 arithmetic, summed in another order (tests/test_rollout.py compares the
    two). The bias is added inside the same op."""
    if ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


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

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: no tokenizer found as a local folder or hub id ({_first_line(e)})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad == EOS is fine: masks come from positions
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str, device: torch.device, gradient_checkpointing: bool = False):
    """Policy weights in fp32 (master copy); bf16 compute comes from `autocast` on CUDA."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: no model found as a local folder or hub id ({_first_line(e)})")
    try:
        output_layer(model)
    except UserError as e:
        raise UserError(f"--model {name}: {e}")
    model.to(device)
    return prepare_for_training(model, gradient_checkpointing)


def prepare_for_training(model, gradient_checkpointing: bool):
    """Training mode (transformers' gradient checkpointing is active only then) with every dropout at 0: the
    log-probs of an update must be those of the policy that sampled (TRL's disable_dropout does the same).
    Every torch.nn.Linear then runs, on the CPU in fp32, through oneDNN's matmul (`linear`); elsewhere as before."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # attention modules read it as a float
            module.attention_dropout = 0.0
        if type(module) is torch.nn.Linear:  # on the CPU in fp32, through oneDNN (see `linear`)
            module.forward = functools.partial(_linear_forward, module)
    if gradient_checkpointing:  # transformers 5 renamed gradient_checkpointing_enable (kept, deprecated)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model


def is_checkpointing(model) -> bool:
    """Whether transformers' activation (gradient) checkpointing is on; transformers 5 renamed
    is_gradient_checkpointing (kept, deprecated) to is_activation_checkpointing."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    return getattr(model, "is_gradient_checkpointing", False) if checkpointing is None else checkpointing


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if ONEDNN and x.device.type == "cpu" and x.dtype == module.weight.dtype == torch.float32:
        if torch.is_grad_enabled():
            return _Linear.apply(x, module.weight, module.bias)
        return linear(x, module.weight, module.bias)  # generation, no-grad passes: no autograd Function to run
    return F.linear(x, module.weight, module.bias)


class _Linear(torch.autograd.Function):
    """F.linear with its three matmuls (forward, input gradient, weight gradient) through `linear` (oneDNN)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        g, x = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = linear(g, weight.t()).view(grad_y.shape[:-1] + (x.shape[-1],)) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:  # g.T @ x. oneDNN copies its first operand row-major: copy the smaller one
            grad_weight = linear(x.t(), g.t()).t() if g.shape[1] > x.shape[1] else linear(g.t(), x.t())
        grad_bias = g.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def load_reference(policy):
    """The frozen reference: a copy of the initial policy. Scripts call this only when they need it."""
    import copy

    ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def load_critic(name: str, device: torch.device, gradient_checkpointing: bool = False):
    """PPO's value model: the backbone of `name` (the initial policy's weights) with a fresh scalar head,
    one value per token (`AutoModelForTokenClassification`, num_labels=1), fp32 like `load_model`.

    The head is zero-initialised, so every value starts at 0 (the return expected before any training
    is unknown; 0 is a neutral start and the head's random init would only add noise), and its dropout
    is set to 0 so the values used in GAE and in the value loss come from the same function.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        config.num_labels, config.classifier_dropout = 1, 0.0
        critic = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: no token-classification (value) model for it ({_first_line(e)})")
    head = critic.score if hasattr(critic, "score") else critic.classifier  # decoder LMs name it `score`
    torch.nn.init.zeros_(head.weight)
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    critic.to(device)
    return prepare_for_training(critic, gradient_checkpointing)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's generation EOS ids."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun): FSDP2 sharding and reductions. In a single process all of it is a no-op.
# ----------------------------------------------------------------------------------------------


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def init_distributed(device: torch.device) -> int:
    """Under torchrun (RANK in the environment): join the process group, nccl on CUDA and gloo on the CPU,
    with this process's GPU the LOCAL_RANK-th one; stdout is silenced on every rank but 0, so only rank 0
    prints. Returns this process's rank (0 without torchrun)."""
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


def shard_model(model):
    """Under torchrun, FSDP2: `fully_shard` every decoder layer (the model's `_no_split_modules`), then the
    root (embeddings, final norm, LM head). Each process then holds 1/world of every weight, gradient and
    optimizer state; a forward all-gathers one layer at a time. Returns the model (unchanged without torchrun,
    or for None)."""
    if model is None or world_size() == 1:
        return model
    import types

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    check(bool(layer_classes), f"{type(model).__name__}: no _no_split_modules, so no decoder layers to shard")
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # completion_logprobs and generate's decoding step call the backbone and the LM head directly, not
    # model.forward: registered as forward methods, they get the root's all-gather before and its gradient
    # reduce-scatter after
    model.fsdp_completion_logprobs = types.MethodType(_completion_logprobs, model)
    register_fsdp_forward_method(model, "fsdp_completion_logprobs")
    model.fsdp_decode_step = types.MethodType(_decode_step, model)
    register_fsdp_forward_method(model, "fsdp_decode_step")
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

    if op == "mean":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor / world_size()
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return tensor


def min_over_processes(value: int, device: torch.device) -> int:
    """The smallest of the processes' values (the value itself in one process)."""
    return int(all_reduce(torch.tensor(value, device=device), "min"))


def mean_over_processes(metrics: dict) -> dict:
    """Each metric averaged over the processes, in one all-reduce (rank 0 logs them)."""
    if world_size() == 1:
        return metrics
    names = list(metrics)
    values = all_reduce(torch.stack([_local(metrics[k]).float() for k in names]), "mean")
    return dict(zip(names, values))


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


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every value is finite, on every process: one host sync for all of them."""
    finite = torch.stack([torch.isfinite(_local(t)).all() for t in tensors]).all()
    return bool(all_reduce(finite.float(), "min"))


def checkpoints(save_dir: str | Path) -> list[Path]:
    """The complete checkpoints `step_N` (those holding a training state) in `save_dir`, oldest first."""
    found = [p for p in Path(save_dir).glob("step_*") if p.name[5:].isdigit() and (p / TRAINING_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _full_states(models: dict, optimizers: dict) -> tuple[dict, dict]:
    """Model and optimizer state dicts, whole, for saving. Under torchrun every process takes part in the
    gather and rank 0 gets the full (unsharded) tensors on the CPU; in a single process the model's own."""
    if world_size() == 1:
        return {name: None for name in models}, {name: opt.state_dict() for name, opt in optimizers.items()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_states = {name: get_model_state_dict(model, options=options) for name, model in models.items()}
    optimizer_states = {
        name: get_optimizer_state_dict(models[name], opt, options=options) for name, opt in optimizers.items()
    }
    return model_states, optimizer_states


def save_training_state(
    save_dir: str, step: int, script: str, tokenizer, models: dict, optimizers: dict, prompts, extra=None,
    keep_last: int = 2,
) -> Path:
    """Write `save_dir/step_{step}`: every model in save_pretrained format (`policy` at the top, any other in a
    subfolder of its name, e.g. `critic/`), the tokenizer, and training_state.pt (script, step, optimizer
    states, the RNG states of every process, the prompt stream's position, and `extra`, a script's own
    state). `optimizers` has the keys of `models`.

    Everything goes to a temporary folder that is renamed into place at the end, so a kill during a save
    leaves the previous checkpoints as they were. Then only the newest `keep_last` checkpoints are kept
    (0: all). Weights that are not finite are never written. Under torchrun every process must call this;
    rank 0 writes.
    """
    local_weights = [getattr(p, "to_local", lambda p=p: p)() for m in models.values() for p in m.parameters()]
    check(all_finite(*local_weights), f"not saving step {step}: the weights hold NaN or inf")
    model_states, optimizer_states = _full_states(models, optimizers)
    rng = [rng_state()]
    if world_size() > 1:
        import torch.distributed as dist

        rng = [None] * world_size()
        dist.all_gather_object(rng, rng_state())
    path = Path(save_dir) / f"step_{step}"
    if rank() == 0:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, model in models.items():
            model.save_pretrained(tmp if name == "policy" else tmp / name, state_dict=model_states[name])
        tokenizer.save_pretrained(tmp)
        state = {
            "script": script,
            "step": step,
            "world_size": world_size(),
            "optimizers": optimizer_states,
            "rng": rng,
            "prompts": prompts.state_dict(),
            "extra": extra or {},
        }
        torch.save(state, tmp / TRAINING_STATE)
        if path.exists():  # the same step saved again (a resumed run): swap, then drop the old one
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        if keep_last:
            for stale in checkpoints(save_dir)[:-keep_last]:
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
    """Restore what save_training_state wrote into the live objects: weights, optimizer states, the prompt
    stream, and the RNG states last, so the next step draws what it would have drawn in an unbroken run.
    Rows of `save_dir`/metrics.jsonl logged after the checkpoint's step are dropped (they will be logged
    again). Under torchrun every process loads; the number of processes must be the one that saved.
    Returns (step, extra).
    """
    path = find_checkpoint(resume)
    try:
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"--resume {path}: cannot read {TRAINING_STATE} ({_first_line(e)})")
    check(
        isinstance(state, dict) and state.get("script") == script,
        f"--resume {path}: a checkpoint of {state.get('script') if isinstance(state, dict) else 'something else'},"
        f" not of {script}",
    )
    check(
        state["world_size"] == world_size(),
        f"--resume {path}: saved by {state['world_size']} process(es), resumed with {world_size()}: use as many",
    )
    try:
        for name, model in models.items():
            folder = path if name == "policy" else path / name
            # from_pretrained, then copy: it resolves tied weights and sharded files like any hub model
            saved = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype).state_dict()
            if world_size() == 1:
                model.load_state_dict(saved)
                optimizers[name].load_state_dict(state["optimizers"][name])
            else:  # every process takes its shard of the full state dicts
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                options = StateDictOptions(full_state_dict=True)
                set_model_state_dict(model, saved, options=options)
                set_optimizer_state_dict(model, optimizers[name], state["optimizers"][name], options=options)
            del saved
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


def append_metrics(save_dir: Optional[str], step: int, metrics: dict):
    """One JSON line per step in `save_dir`/metrics.jsonl (nothing without --save-dir; rank 0 only)."""
    if save_dir and rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        with open(Path(save_dir) / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + T) left-padded prompt followed by the completion
    attention_mask: torch.Tensor  # (B, P + T) 0 on left padding only
    prompt_len: int  # P, the padded prompt width
    completion_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) float, 1 up to and including the first EOS
    lengths: torch.Tensor  # (B,) long, tokens per completion (EOS counted)
    truncated: torch.Tensor  # (B,) bool, no EOS within max_new_tokens
    entropy: torch.Tensor  # (B, T) entropy of each token's sampling distribution (0 past the completion)
    logprobs: torch.Tensor  # (B, T) log-prob of each token under its sampling distribution (0 past it; greedy: 0)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]):
    """Mask from positions: 1 up to and including the first EOS, all ones if there is none.

    Never compares with the pad id, so pad == EOS still trains the EOS token.
    Returns (mask float (B, T), lengths long (B,), truncated bool (B,)).
    """
    B, T = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    truncated = ~is_eos.any(dim=1)
    first_eos = torch.where(truncated, T - 1, is_eos.int().argmax(dim=1))  # argmax finds the first True
    positions = torch.arange(T, device=completion_ids.device)
    mask = (positions[None, :] <= first_eos[:, None]).float()
    return mask, first_eos + 1, truncated


def format_prompt(tokenizer, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


@torch.no_grad()
@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    greedy: bool = False,
) -> Rollout:
    """Sample `group_size` completions per prompt, each prompt's completions contiguous (row i*G + j).

    A plain decoding loop over the model's KV cache. Each token is an exact sample of softmax(logits / T)
    (inverse-CDF sampling in float64), with no top-k, top-p or repetition penalty from the model's generation
    config: the log-probs computed later are those of the distribution that sampled. `greedy` takes the argmax.
    After its EOS a row gets pad tokens; the loop stops once every row has ended (under torchrun, every
    process's). The entropy of each sampling distribution (the `policy/entropy` metric) and the log-prob of each
    sampled token are recorded: on-policy they are the update's values (completion_logprobs).
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    input_ids = enc.input_ids.repeat_interleave(group_size, dim=0)
    attention_mask = enc.attention_mask.repeat_interleave(group_size, dim=0)
    B, P = input_ids.shape
    completion_ids = input_ids.new_full((B, max_new_tokens), tokenizer.pad_token_id)
    entropy = torch.zeros(B, max_new_tokens, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    eos = torch.tensor(eos_ids, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    prompt_positions = (enc.attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding does not shift them
    position_ids = prompt_positions.repeat_interleave(group_size, dim=0)
    step_mask, cdf = attention_mask, None
    was_training = model.training
    model.eval()
    if hasattr(model, "fsdp_decode_step"):  # sharded by shard_model: the same code, as an FSDP forward
        decode_step = model.fsdp_decode_step
    else:
        decode_step = functools.partial(_decode_step, model)
    with autocast(device):
        # the G completions of a prompt share it: each prompt runs through the model once, then its KV cache
        # and its last logits are repeated G times (rows i*G + j)
        cache, logits = decode_step(enc.input_ids, enc.attention_mask, prompt_positions, None)
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        for t in range(max_new_tokens):
            if t > 0:
                cache, logits = decode_step(step_ids, step_mask, position_ids, cache)
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                log_probs = torch.log_softmax(logits / temperature, dim=-1)
                probs = log_probs.exp()
                entropy[:, t] = -(probs * log_probs).sum(dim=-1)
                # Inverse CDF: the first token whose cumulative probability exceeds u ~ U[0, total). The running
                # sum is float64: in float32 each of the ~150k additions could misplace up to 3e-8 of mass.
                # (One uniform per row; Gumbel-max needs one per vocabulary entry, 5x slower here on the CPU.)
                if cdf is None:
                    cdf = torch.empty(logits.shape, dtype=torch.float64, device=device)
                torch.cumsum(probs, dim=-1, dtype=torch.float64, out=cdf)
                u = torch.rand(B, 1, dtype=torch.float64, device=device) * cdf[:, -1:]
                token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
                logprobs[:, t] = log_probs.gather(1, token[:, None]).squeeze(1)
            token = token.masked_fill(ended, tokenizer.pad_token_id)
            completion_ids[:, t] = token
            ended |= torch.isin(token, eos)
            # one host sync per token to know whether to stop (every process must run as many forward passes)
            if min_over_processes(int(ended.all()), device):
                break
            step_ids = token[:, None]
            step_mask = torch.cat([step_mask, step_mask.new_ones(B, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
    model.train(was_training)
    del cache, cdf  # the KV cache is freed before any training pass
    mask, lengths, truncated = completion_mask(completion_ids, eos_ids)
    full_ids = torch.cat([input_ids, completion_ids], dim=1)
    full_attention = torch.cat([attention_mask, torch.ones_like(completion_ids)], dim=1)
    return Rollout(
        full_ids, full_attention, P, completion_ids, mask, lengths, truncated, entropy * mask, logprobs * mask
    )


def output_layer(model):
    """The LM head, checked: a plain Linear whose output the model takes as its logits unchanged (log-probs and
    sampling here multiply by its weight directly, so a softcap or scale in the model's forward would be lost)."""
    lm_head = model.get_output_embeddings()
    check(isinstance(lm_head, torch.nn.Linear),
          f"{type(model).__name__}: output layer {type(lm_head).__name__}; only a plain torch.nn.Linear is supported")
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(model.config, name, None)
        check(value in (None, 1, 1.0), f"{type(model).__name__}: {name}={value} changes the logits after the "
              "output layer, which this project does not support")
    return lm_head


def _decode_step(model, input_ids, attention_mask, position_ids, cache):
    """The backbone over the new tokens (extending the KV cache `cache`), then the logits of the last position
    only, in float32, through `linear` (on the CPU in fp32: oneDNN's matmul, as in completion_logprobs)."""
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
        use_cache=True,
    )
    lm_head = output_layer(model)
    logits = linear(out.last_hidden_state[:, -1], lm_head.weight)
    if lm_head.bias is not None:
        logits = logits + lm_head.bias
    return out.past_key_values, logits.float()


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    """The dtype `autocast` would multiply in (bf16 on CUDA); the weight's own dtype otherwise."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype


def _chunk_logits(hidden, weight, bias, temperature):
    """(hidden @ weight.T + bias) / temperature, in float32 (or wider): a fresh tensor, modified in place after."""
    z = linear(hidden, weight)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    if bias is not None:
        z += bias
    return z.div_(temperature)


def _grad_logit_chunks(hidden, weight, bias, targets, temperature, chunk_size, dtype, g_logp, g_entropy):
    """Recompute z = logits / T chunk by chunk and turn it, in place, into dL/dlogits for upstream gradients
    g_logp, g_entropy (already divided by T: dz / dlogits = 1 / T). Yields (rows, hidden rows, weight, dL/dlogits)
    in the compute dtype, for the caller's matmuls. tests/test_rollout.py checks by hand and with gradcheck:
      d logp / dz_j = [j = target] - p_j
      d H / dz_j    = -p_j (log p_j + H)          (H = -sum_j p_j log p_j)
    """
    w = weight.to(dtype)  # cast once, not per chunk (a no-op in fp32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, hidden.shape[0]))
        h = hidden[rows].to(dtype)
        p = None
        d = _chunk_logits(h, w, bias, temperature)
        d.sub_(d.amax(dim=1, keepdim=True))  # z - max
        if g_entropy is None:
            d.exp_()
            d.mul_(-g_logp[rows, None] / d.sum(dim=1, keepdim=True))  # -g p
        else:
            p = d.exp()
            total = p.sum(dim=1, keepdim=True)
            entropy = total.log() - (p[:, None, :] @ d[:, :, None]).view(-1, 1) / total
            p.div_(total)
            d.sub_(total.log())  # log p
            d.add_(entropy).mul_(-g_entropy[rows, None]).sub_(g_logp[rows, None]).mul_(p)  # -p (g + g_H (log p + H))
        d.scatter_add_(1, targets[rows, None], g_logp[rows, None])  # + g [j = target]
        yield rows, h, w, d
        del h, d, p  # before the next chunk's logits exist (the caller drops its own reference too)


def _add_weight_grad(grad_weight, d, h, first: bool):
    """grad_weight (+)= d.T @ h, in place (addmm_: no vocabulary x hidden temporary); the first chunk overwrites."""
    if d.dtype == h.dtype == grad_weight.dtype:
        grad_weight.addmm_(d.t(), h, beta=0 if first else 1)
    else:
        partial = (d.to(h.dtype).t() @ h).to(grad_weight.dtype)
        grad_weight.copy_(partial) if first else grad_weight.add_(partial)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(z)[target], z = (hidden @ W.T + b) / T, for N tokens, and optionally the entropy of softmax(z),
    `chunk_size` tokens of logits at a time.

    Nothing logits-sized is kept: the backward recomputes each chunk's z and turns it into dL/dlogits in place
    (_grad_logit_chunks); the weight gradient accumulates with addmm_. (Autograd's own version, checkpointing
    each chunk, allocates a fresh logits-sized tensor for nearly every op and a vocabulary x hidden weight
    gradient per chunk.) With `values` = (logp, entropy) the forward returns those instead of computing them
    (see completion_logprobs). With `tie` (a dict shared with _TiedEmbedding: the input embedding is this
    weight) the weight gradient is left to the embedding's backward, which runs after the backbone's.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy, values, tie):
        dtype = _compute_dtype(hidden.device, weight)
        float_dtype = torch.promote_types(dtype, torch.float32)  # the softmax runs in fp32 at least
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk_size, ctx.dtype, ctx.tie = temperature, chunk_size, dtype, tie
        N = hidden.shape[0]
        if values is not None:
            logp = values[0].reshape(N).to(float_dtype, copy=True)
            return (logp, values[1].reshape(N).to(float_dtype, copy=True)) if with_entropy else logp
        logp = hidden.new_empty(N, dtype=float_dtype)
        entropy = torch.empty_like(logp) if with_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # cast once, not per chunk (a no-op in fp32)
            for start in range(0, N, chunk_size):
                rows = slice(start, min(start + chunk_size, N))
                z = _chunk_logits(hidden[rows].to(dtype), w, bias, temperature)
                target_z = z.gather(1, targets[rows, None]).squeeze(1)
                z_max = z.amax(dim=1, keepdim=True)
                z.sub_(z_max)  # exp cannot overflow
                q = z.exp() if with_entropy else z.exp_()
                total = q.sum(dim=1)
                if with_entropy:  # H = log(total) - sum q (z - max) / total, with q = exp(z - max)
                    entropy[rows] = total.log() - (q[:, None, :] @ z[:, :, None]).flatten() / total
                logp[rows] = target_z - z_max.squeeze(1) - total.log()
                del z, q  # one chunk of logits alive at a time, not two
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        T = ctx.temperature
        chunks = dict(hidden=hidden, weight=weight, bias=bias, targets=targets, temperature=T,
                      chunk_size=ctx.chunk_size, dtype=ctx.dtype, g_logp=grad_logp / T,
                      g_entropy=None if grad_entropy is None else grad_entropy / T)
        # tied: the embedding's backward computes the weight gradient once the backbone's activations are freed,
        # at the price of recomputing the logits once more (measured: 0.2 GiB less at the peak on Qwen2.5-0.5B's
        # shapes with 2 layers; on a deep model up to the activation memory or this gradient's size, the smaller)
        defer = ctx.tie is not None and need_weight
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight and not defer else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        if need_hidden or grad_weight is not None or need_bias:
            with torch.autocast(hidden.device.type, enabled=False):
                for rows, h, w, d in _grad_logit_chunks(**chunks):
                    if need_hidden:
                        grad_hidden[rows] = linear(d.to(w.dtype), w.t()).to(hidden.dtype)  # d @ W
                    if grad_weight is not None:
                        _add_weight_grad(grad_weight, d, h, first=rows.start == 0)
                    if need_bias:
                        grad_bias += d.sum(dim=0).to(grad_bias.dtype)
                    del d  # one chunk of logits alive at a time, not two
        if defer:
            ctx.tie["chunks"] = chunks
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


class _TiedEmbedding(torch.autograd.Function):
    """F.embedding(input_ids, weight, padding_idx) for an input embedding tied to the output projection.

    Its backward returns the weight's whole gradient: the projection's, which _TokenLogprobs leaves to it in
    `tie` (this lookup feeds the whole backbone, so its backward runs last, after the backbone's activations are
    freed), plus its own rows, added in place. Autograd would otherwise also build a dense vocabulary x hidden
    gradient for the few hundred looked-up rows and add the two.
    """

    @staticmethod
    def forward(ctx, input_ids, weight, padding_idx, tie):
        ctx.save_for_backward(input_ids)
        ctx.padding_idx, ctx.tie, ctx.weight_shape, ctx.weight_dtype = padding_idx, tie, weight.shape, weight.dtype
        return F.embedding(input_ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (input_ids,) = ctx.saved_tensors
        ids, grad_rows = input_ids.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            keep = ids != ctx.padding_idx
            ids, grad_rows = ids[keep], grad_rows[keep]
        chunks = ctx.tie.pop("chunks", None)
        grad_bytes = math.prod(ctx.weight_shape) * ctx.weight_dtype.itemsize
        if grad_output.device.type == "cpu" and grad_bytes >= MMAP_THRESHOLD:
            # the backbone's activations were just freed and this gradient will be mapped fresh: return the freed
            # heap first (measured: 0.17 GiB off the qwen-shape benchmark's peak)
            return_freed_cpu_memory()
        if chunks is None:  # the log-probs were not part of the loss
            grad_weight = grad_output.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        else:
            grad_weight = grad_output.new_empty(ctx.weight_shape, dtype=ctx.weight_dtype)  # the first chunk writes
            # a quarter of the chunk: this pass runs at the step's memory peak, and addmm_ keeps its rate at
            # a quarter of the rows (measured: 191 vs 195 GFLOP/s on Qwen2.5-0.5B's shapes)
            chunks["chunk_size"] = max(1, chunks["chunk_size"] // 4)
            with torch.autocast(grad_output.device.type, enabled=False):
                for rows, h, w, d in _grad_logit_chunks(**chunks):
                    _add_weight_grad(grad_weight, d, h, first=rows.start == 0)
                    del d  # one chunk of logits alive at a time, not two
        grad_weight.index_add_(0, ids, grad_rows.to(grad_weight.dtype))
        return None, grad_weight, None, None


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float,
    chunk_size: Optional[int] = None,
    with_entropy: bool = False,
    values: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
):
    """Log-prob of every completion token under `model` at the sampling temperature, shape (B, T).

    The backbone runs once; the vocabulary projection runs over completion positions only, `chunk_size`
    tokens at a time (default: 2^25 logits' worth, 128 MB in fp32), so the (B, T, vocab) float32 logits never
    exist at once. With gradients on, each chunk's logits are recomputed in the backward pass instead of kept
    (_TokenLogprobs). With `with_entropy`, also returns the entropy of softmax(logits / temperature) per
    token, computed from the same logits (and carrying gradient when gradients are on); otherwise None.

    `values` = (logp, entropy) of these very tokens under these very weights, already computed: on-policy, the
    sampler's (Rollout.logprobs, Rollout.entropy). They are returned as the values, and the projection runs only
    in the backward pass, for the gradient, which is that of the full computation at the current weights.
    """
    if hasattr(model, "fsdp_completion_logprobs"):  # sharded by shard_model: the same code, as an FSDP forward
        forward = model.fsdp_completion_logprobs
    else:
        forward = functools.partial(_completion_logprobs, model)
    return forward(input_ids, attention_mask, prompt_len, temperature, chunk_size, with_entropy, values)


def _prompt_group_sizes(model, input_ids, attention_mask, prompt_len) -> Optional[torch.Tensor]:
    """Sizes of the runs of consecutive rows that share a prompt (`generate` puts a group's rows together), or
    None when no two neighbouring rows share one, when there is no completion position to run after the prompt,
    or under gradient checkpointing (which turns the KV cache off). A sharded model (shard_model) shares only
    when every process does: each backbone call all-gathers the weights, so all must make the same calls."""
    sizes = None
    if input_ids.shape[1] > prompt_len and not is_checkpointing(model):
        ids, mask = input_ids[:, :prompt_len], attention_mask[:, :prompt_len]
        new_prompt = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        new_prompt[1:] = ((ids[1:] != ids[:-1]) | (mask[1:] != mask[:-1])).any(dim=1)
        first = new_prompt.nonzero().squeeze(1)
        if len(first) < ids.shape[0]:
            sizes = torch.diff(first, append=first.new_tensor([ids.shape[0]]))
    if hasattr(model, "fsdp_completion_logprobs") and not min_over_processes(sizes is not None, input_ids.device):
        return None
    return sizes


def _completion_logprobs(model, input_ids, attention_mask, prompt_len, temperature, chunk_size, with_entropy,
                         values=None):
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # same positions as `generate` used
    device = input_ids.device
    targets = input_ids[:, prompt_len:]
    # position p predicts token p + 1: completion token t is predicted from position P - 1 + t, and the last
    # position predicts nothing, so the backbone runs without it
    input_ids, attention_mask, position_ids = input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1]
    lm_head, embeddings = output_layer(model), model.get_input_embeddings()
    tie = None
    if (torch.is_grad_enabled() and lm_head.weight.requires_grad and embeddings.weight is lm_head.weight
            and type(embeddings) is torch.nn.Embedding and embeddings.max_norm is None
            and not embeddings.scale_grad_by_freq and not embeddings.sparse):
        tie = {}
        inputs_embeds = _TiedEmbedding.apply(input_ids, embeddings.weight, embeddings.padding_idx, tie)
    else:
        inputs_embeds = embeddings(input_ids)
    with autocast(device):
        group_sizes = _prompt_group_sizes(model, input_ids, attention_mask, prompt_len)
        if group_sizes is None:
            hidden = model.base_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state[:, prompt_len - 1 :]
        else:
            # each distinct prompt runs through the backbone once, as in `generate`: its KV cache and its last
            # hidden state are repeated over the rows that share it (the gradients of the copies add up)
            first = torch.cumsum(group_sizes, 0) - group_sizes
            prompt = model.base_model(
                inputs_embeds=inputs_embeds[first, :prompt_len], attention_mask=attention_mask[first, :prompt_len],
                position_ids=position_ids[first, :prompt_len], use_cache=True,
            )
            cache = prompt.past_key_values
            cache.batch_repeat_interleave(group_sizes)
            completion = model.base_model(
                inputs_embeds=inputs_embeds[:, prompt_len:], attention_mask=attention_mask,
                position_ids=position_ids[:, prompt_len:], past_key_values=cache, use_cache=True,
            )
            last_prompt = prompt.last_hidden_state[:, -1:].repeat_interleave(group_sizes, dim=0)
            hidden = torch.cat([last_prompt, completion.last_hidden_state], dim=1)
    B, T, H = hidden.shape
    chunk_size = chunk_size or max(1, 2**25 // lm_head.weight.shape[0])
    with autocast(device):
        out = _TokenLogprobs.apply(
            hidden.reshape(B * T, H), lm_head.weight, lm_head.bias, targets.reshape(B * T),
            temperature, chunk_size, with_entropy, values, tie,
        )
    logp, entropy = out if with_entropy else (out, None)
    # new tensors, not views: FSDP2 hooks the outputs of a forward for the backward pass
    logp = logp.view(B, T).clone()
    entropy = entropy.view(B, T).clone() if with_entropy else None
    return logp, entropy


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


def gsm8k_task(num_eval: int = 500) -> Task:
    """GSM8K (openai/gsm8k, main): train split for training, the first `num_eval` test rows held out."""
    try:
        from datasets import load_dataset

        data = load_dataset("openai/gsm8k", "main")
    except Exception as e:  # no network, no cache: say so in one line
        raise UserError(f"--task gsm8k: could not load openai/gsm8k with `datasets` ({_first_line(e)})")

    def rows(split):
        return [
            {"prompt": GSM8K_PROMPT.format(question=r["question"]), "answer": gsm8k_reference(r["answer"])}
            for r in split
        ]

    return Task("gsm8k", rows(data["train"]), rows(data["test"])[:num_eval], numeric_reward, True)


def gsm8k_reference(solution: str) -> str:
    """The reference answer is the text after '####', with thousands separators removed."""
    return solution.split("####")[-1].strip().replace(",", "")


def jsonl_task(path: str) -> Task:
    """Rows {"prompt": ..., "answer": ...}; a fixed 10% (at least one row) is held out."""
    file = Path(path)
    check(file.is_file(), f"--task jsonl:{path}: file not found")
    rows = []
    with open(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except ValueError:  # bad UTF-8, bad JSON, or an integer too long to convert
                raise UserError(f"--task jsonl:{path}: line {number} is not valid JSON in UTF-8")
            if row is None:
                continue
            check(
                isinstance(row, dict) and "prompt" in row and "answer" in row,
                f"--task jsonl:{path}: line {number} needs both 'prompt' and 'answer'",
            )
            rows.append({"prompt": str(row["prompt"]), "answer": str(row["answer"])})
    check(len(rows) >= 2, f"--task jsonl:{path}: needs at least 2 rows (one is held out), found {len(rows)}")
    random.Random(0).shuffle(rows)
    num_eval = max(1, len(rows) // 10)
    return Task(f"jsonl:{path}", rows[num_eval:], rows[:num_eval], exact_reward, True)


TASKS = "arithmetic, countdown, gsm8k, jsonl:PATH"


def load_task(name: str) -> Task:
    if name == "arithmetic":
        return arithmetic_task()
    if name == "countdown":
        return countdown_task()
    if name == "gsm8k":
        return gsm8k_task()
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
def evaluate(model, tokenizer, task: Task, max_new_tokens: int, eos_ids: list[int], batch_size: int = 64):
    """Greedy accuracy on the fixed held-out rows. Returns (accuracy, [(prompt, completion, reward)]).

    The RNG states are restored afterwards, so evaluating (how often, or once more after a resume) never
    changes what training samples. Under torchrun each process evaluates its share of the rows (padded to
    equal shares with rows that do not count) and the accuracy is summed over processes; the samples are
    this process's.
    """
    per_process = math.ceil(len(task.eval) / world_size())
    rows = task.eval[rank() * per_process : (rank() + 1) * per_process]
    counts = [1.0] * len(rows) + [0.0] * (per_process - len(rows))
    rows = rows + [task.eval[0]] * (per_process - len(rows))
    rewards, samples = [], []
    cuda = [torch.cuda.current_device()] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            prompts = [format_prompt(tokenizer, r["prompt"], task.use_chat_template) for r in batch]
            rollout = generate(model, tokenizer, prompts, 1, max_new_tokens, 1.0, eos_ids, greedy=True)
            completions = decode_completions(tokenizer, rollout)
            batch_rewards = score(task, completions, batch, 1)
            rewards.append(batch_rewards)
            samples += [(r["prompt"], c, float(x)) for r, c, x in zip(batch, completions, batch_rewards)]
    correct = (torch.cat(rewards).eq(1.0).float() * torch.tensor(counts)).sum()
    accuracy = all_reduce(correct.to(model.device), "sum").item() / len(task.eval)
    return accuracy, samples[: sum(int(c) for c in counts)]
