"""What the algorithm scripts share: loading, several processes (FSDP2), checkpoints, rollout and log-probs.

The tasks and their rewards are in tasks.py; no loss or advantage code lives in either: each script owns its own.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from safetensors import SafetensorError
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parent
TINY_MODEL = ROOT / "assets" / "tiny-llama"
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# an Args field left None takes the preset's value; --help says so instead of "(default: None)"
T = TypeVar("T")
FromPreset = Annotated[Optional[T], tyro.conf.arg(help_behavior_hint="(default: from the preset)")]


class UserError(Exception):
    """Bad input, or a run that cannot go on: reported as one line, exit code 2, no traceback."""


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check(condition: bool, message: str):
    if not condition:
        raise UserError(message)


def check_flags(args, at_least: dict, positive: tuple = ()):
    """Each flag in `at_least` is None or at least its bound, each in `positive` above 0; else a one-line error."""
    for name, bound in at_least.items():
        value = getattr(args, name)
        check(value is None or value >= bound, f"--{name.replace('_', '-')} {value}: must be at least {bound}")
    for name in positive:
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")


def check_batches(args, per_prompt: int, per_prompt_flag: str, world_size: int):
    """--num-prompts splits over the processes, --num-minibatches divides each process's num_prompts x per_prompt
    completions, and --micro-batch-size divides the minibatch."""
    check(args.num_prompts % world_size == 0,
          f"--num-prompts {args.num_prompts}: must be divisible by the number of processes ({world_size})")
    batch = args.num_prompts // world_size * per_prompt
    check(args.num_minibatches >= 1 and batch % args.num_minibatches == 0,
          f"--num-minibatches {args.num_minibatches}: must divide the {batch} completions trained on per step"
          f" (--num-prompts x {per_prompt_flag} / processes)")
    minibatch = batch // args.num_minibatches
    micro = minibatch if args.micro_batch_size is None else args.micro_batch_size
    given = " (yours, or the paper preset's)" if args.preset == "paper" else ""  # that preset sets one
    check(micro >= 1 and minibatch % micro == 0,
          f"--micro-batch-size {args.micro_batch_size}{given}: must divide the minibatch of {minibatch} completions")


def check_save_dir(args):
    """--save-every needs --save-dir, a folder this run can create and write that holds no other run's checkpoints
    or metrics (this run would replace, prune or append to them), unless it is the folder of the resumed one."""
    check(not args.save_every or args.save_dir, f"--save-every {args.save_every}: needs --save-dir")
    if args.save_dir:
        folder = Path(args.save_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--save-dir {args.save_dir}: cannot create the folder ({_first_line(e)})")
        check(os.access(folder, os.W_OK | os.X_OK), f"--save-dir {args.save_dir}: this user cannot write in it")
        if args.resume and find_checkpoint(args.resume).parent.resolve() == folder.resolve():
            return  # the resumed run's own folder
        last = checkpoints(folder)[-1:]
        check(not last, f"--save-dir {args.save_dir}: holds another run's {last[0].name if last else ''}; continue it"
              f" with --resume {args.save_dir}, or give another --save-dir")
        check(not (folder / METRICS_FILE).exists(), f"--save-dir {args.save_dir}: holds the {METRICS_FILE} of a run"
              " with no checkpoint to continue; remove it, or give another --save-dir")


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def get_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU. `cuda` under torchrun: each process its LOCAL_RANK-th GPU."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        device = None
    check(device is not None and device.type in ("cpu", "cuda"), f"--device {name}: not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        check(torch.cuda.is_available(), f"--device {name}: torch sees no CUDA device here")
        check(device.index is None or world_size() == 1,
              f"--device {name}: under torchrun pass --device cuda (each process takes its LOCAL_RANK-th GPU)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index)
        check(device.index < torch.cuda.device_count(),
              f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)
    return device


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of forward and backward passes (`auto`: bf16 on CUDA, else fp32). Weights, AdamW states, log-probs,
    losses and advantages are fp32 whatever it is."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


# Loading -----------------------------------------------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """`tiny` is the model shipped in assets/; anything else is a hub id or a local folder."""
    return str(TINY_MODEL) if name == "tiny" else name


def is_tiny(name: str) -> bool:
    return Path(resolve_model_path(name)).resolve() == TINY_MODEL


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    check(not name.startswith(("/", ".")) or Path(name).is_dir(), f"--model {name}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: cannot load a tokenizer from it ({_first_line(e)})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad == EOS is fine: masks come from positions
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name: str, device, dtype=torch.float32, attn_implementation="sdpa", gradient_checkpointing=False,
               trainable=True):
    """The causal LM `name`, fp32 weights, ready to train (or frozen: a reference model), placed by `place`."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, attn_implementation=attn_implementation)
    try:
        output_layer(model)
    except UserError as e:
        raise UserError(f"--model {name}: {e}")
    return place(prepare(model, gradient_checkpointing, trainable), device, dtype)


def load_critic(name: str, device, dtype=torch.float32, attn_implementation="sdpa", gradient_checkpointing=False):
    """PPO's value model: the backbone of `name` with a scalar head, one value per token, zero-initialised so that
    every value starts at 0 (no return is known before training)."""
    from transformers import AutoModelForTokenClassification

    critic = _from_pretrained(AutoModelForTokenClassification, name, num_labels=1,
                              attn_implementation=attn_implementation)
    head = critic.score if hasattr(critic, "score") else critic.classifier  # decoder LMs name it `score`
    torch.nn.init.zeros_(head.weight)
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    return place(prepare(critic, gradient_checkpointing), device, dtype)


def _from_pretrained(cls, name: str, attn_implementation: str, **kwargs):
    """In fp32 on the CPU: every process loads there, and `place` moves only its shard to the accelerator."""
    check(attn_implementation in ATTENTION,
          f"--attn-implementation {attn_implementation}: choose one of {', '.join(ATTENTION)}")
    kwargs["attn_implementation"] = attn_implementation
    # transformers 5.25 swaps layers for kernels fetched from the Hub unless told not to: keep PyTorch's, offline
    kwargs["use_kernels"] = False
    try:
        return cls.from_pretrained(resolve_model_path(name), dtype=torch.float32, **kwargs)
    except ImportError as e:  # flash_attention_2 or 3 without its package
        raise UserError(f"--attn-implementation {attn_implementation}: not available here ({_first_line(e)})")
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: cannot load a model from it ({_first_line(e)})")


def prepare(model, gradient_checkpointing: bool, trainable: bool = True):
    """Training mode with every dropout at 0 (as TRL's disable_dropout), so an update's log-probs are those of the
    policy that sampled; transformers checkpoints activations in training mode only. Frozen: eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if gradient_checkpointing and trainable:  # transformers 5 renamed gradient_checkpointing_enable
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model.train(trainable).requires_grad_(trainable)


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
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id not in ids + [None] else ids


# Placement and several processes (torchrun): FSDP2 as torchtitan uses it -------------------------------------------


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def init_distributed(device: torch.device) -> int:
    """Under torchrun, join the process group (nccl on CUDA, gloo on the CPU) and silence stdout on every rank but
    0. Returns this process's rank (0 without torchrun)."""
    if "RANK" not in os.environ:
        return 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank()


def finish_distributed():
    if dist.is_initialized():
        # lets gloo's workers free the last collective's tensors (they take the GIL) before the interpreter exits
        dist.barrier()
        dist.destroy_process_group()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def place(model, device: torch.device, dtype: torch.dtype):
    """One process in fp32: the model as it is, moved to `device`. Otherwise FSDP2's `fully_shard` on every decoder
    layer, then on the root (embeddings, final norm, LM head): each process keeps 1/world of every fp32 weight,
    gradient and AdamW state, a forward gathers one layer at a time in `dtype`, and gradients are reduced in fp32.
    One process in bf16 is a process group of one: the code path of eight GPUs."""
    if world_size() == 1 and dtype == torch.float32:
        return model.to(device)
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
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return tensor / world_size() if op == "mean" else tensor


def min_over_processes(value: int, device: torch.device) -> int:
    return int(all_reduce(torch.tensor(value, device=device), "min"))


def mean_over_processes(metrics: dict) -> dict:
    """Each metric averaged over the processes, in one all-reduce (rank 0 logs them)."""
    if world_size() == 1:
        return metrics
    return dict(zip(metrics, all_reduce(torch.stack([_local(v).float() for v in metrics.values()]), "mean")))


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every value is finite, on every process: one host sync for all of them."""
    return bool(all_reduce(torch.stack([torch.isfinite(_local(t)).all() for t in tensors]).all().float(), "min"))


# Checkpoints and resuming: nothing already computed is lost when a run dies ----------------------------------------

TRAINING_STATE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"


def rng_state() -> dict:
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "torch": torch.get_rng_state(), **cuda}


def checkpoints(save_dir: str | Path) -> list[Path]:
    """The complete checkpoints `step_N` (those holding a training state) in `save_dir`, oldest first."""
    found = [p for p in Path(save_dir).glob("step_*") if p.name[5:].isdigit() and (p / TRAINING_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _flush_to_disk(*paths: Path):
    """fsync each file or folder, so that what the rename after it publishes survives a crash of the machine."""
    for path in paths:
        if os.name == "nt" and path.is_dir():  # Windows cannot open a folder to flush it
            continue
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)  # Windows flushes only writable files
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_training_state(save_dir, step: int, script: str, tokenizer, models: dict, optimizers: dict, prompts,
                        extra=None, keep_last: int = 2) -> Path:
    """Write `save_dir/step_{step}`: every model in save_pretrained format (`policy` at the top, others in a
    subfolder of their name), the tokenizer, and training_state.pt (script, step, optimizer states, every process's
    RNG states, the prompt stream, `extra`). It is written to a temporary folder, flushed to disk and renamed into
    place, so a kill or a crash during a save leaves the previous checkpoints as they were; the newest `keep_last`
    are kept (0: all). Weights that are not finite are never written. Every process calls this; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    check(all_finite(*[getattr(p, "to_local", lambda p=p: p)() for m in models.values() for p in m.parameters()]),
          f"not saving step {step}: the weights hold NaN or inf")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered whole on rank 0
    model_states = {k: _gathered_weights(m, options) if is_sharded(m) else None for k, m in models.items()}
    # keyed by parameter name, sharded or not: a run can resume in another precision (fp32 on a CPU, bf16 on a GPU);
    # none before the first update (torch would make them with a step at lr 0, and saving would change the run)
    optimizer_states = {k: get_optimizer_state_dict(models[k], opt, options=options) if opt.state else
                        {"state": {}, "param_groups": []} for k, opt in optimizers.items()}
    rng = [rng_state()] * world_size()
    if world_size() > 1:  # every process's RNG states, so that each resumes its own stream
        dist.all_gather_object(rng, rng_state())
    path = Path(save_dir) / f"step_{step}"
    if rank() == 0:
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        for leftover in Path(save_dir).glob("step_*.tmp"):  # this one, and any an earlier kill during a save left
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            for name, model in models.items():
                model.save_pretrained(tmp if name == "policy" else tmp / name, state_dict=model_states[name])
            tokenizer.save_pretrained(tmp)
            torch.save({"script": script, "step": step, "world_size": world_size(), "optimizers": optimizer_states,
                        "rng": rng, "prompts": prompts.state_dict(), "extra": extra or {}}, tmp / TRAINING_STATE)
            metrics = Path(save_dir) / METRICS_FILE  # the rows logged up to this step go to disk with it
            _flush_to_disk(*sorted(tmp.rglob("*")), tmp, *[metrics] * metrics.is_file())  # then the rename shows them
        except (OSError, SafetensorError) as e:  # a full disk: the half-written folder goes, the older ones stay
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot save step {step} in {save_dir} ({_first_line(e)}); the checkpoints saved before"
                            " are intact")
        if path.exists():  # the same step saved again (a resumed run): swap, then drop the old one
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        _flush_to_disk(path.parent)  # the rename itself, before older checkpoints are removed
        shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoints(save_dir)[:-keep_last] if keep_last else []:
            shutil.rmtree(stale)
    if world_size() > 1:
        dist.barrier()  # the checkpoint is on disk before any process goes on
    return path


def find_checkpoint(resume: str) -> Path:
    """`resume` is a checkpoint folder, or a --save-dir whose newest complete checkpoint is taken."""
    path = Path(resume)
    check(path.is_dir(), f"--resume {resume}: no such folder")
    found = [path] if (path / TRAINING_STATE).is_file() else checkpoints(path)
    check(bool(found), f"--resume {resume}: not a checkpoint (no {TRAINING_STATE}) and holds no step_N checkpoint")
    return found[-1]


def _gathered_weights(model, options) -> dict:
    """A sharded model's full state dict without the second name of a tied weight (an LM head tied to the
    embedding): gathered, the two are separate tensors, and save_pretrained would write both."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    second = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {name: t for name, t in get_model_state_dict(model, options=options).items() if name not in second}


def load_training_state(resume: str, script: str, models: dict, optimizers: dict, prompts, save_dir=None,
                        num_steps: Optional[int] = None):
    """Restore what save_training_state wrote into the live objects, the RNG states last, so that the next step draws
    what it would have drawn in an unbroken run; drop the metrics.jsonl rows logged after the checkpoint (they will
    be logged again). The number of processes and the task must be the ones that saved, the checkpoint before
    `num_steps` and the newest in the folder the run goes on saving to; each is checked before anything is changed.
    Returns (step, extra)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = find_checkpoint(resume)
    try:  # mapped by the other processes, which never read its optimizer states (the first sends their shards)
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True, mmap=rank() > 0)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"--resume {path}: cannot read {TRAINING_STATE} ({_first_line(e)})")
    saved_by = state.get("script") if isinstance(state, dict) else "something else"
    check(saved_by == script, f"--resume {path}: a checkpoint of {saved_by}, not of {script}")
    check("start_eval" in state.get("extra", {}) and all(isinstance(key, str) for optimizer in
          state["optimizers"].values() for key in optimizer["state"]),
          f"--resume {path}: written by an older version of {script}: resume it with that version")
    check(state["world_size"] == world_size(),
          f"--resume {path}: saved by {state['world_size']} process(es), resumed with {world_size()}: use as many")
    step, folder = state["step"], Path(save_dir or path.parent)
    check(num_steps is None or step < num_steps, f"--num-steps {num_steps}: the checkpoint is already at step {step}")
    later = [p.name for p in checkpoints(folder) if int(p.name[5:]) > step]  # another run's future: keep it
    check(not later, f"--resume {path}: {folder} holds later checkpoints ({', '.join(later)}): resume from the newest"
          " or give another --save-dir")
    for name, optimizer in optimizers.items():  # the checkpoint's would silently win over this run's flags
        saved, own = state["optimizers"][name], {key: tuple(p.shape) for key, p in models[name].named_parameters()}
        names = {key for group in saved["param_groups"] for key in group["params"]}  # with a state yet or not
        check(names in (set(), own.keys()) and all(own[key] == next(tuple(t.shape) for t in value.values() if t.dim())
              for key, value in saved["state"].items()), f"--resume {path}: its {name} has other weights than --model")
        flags = {"lr": f"--{'critic-' if name == 'critic' else ''}learning-rate", "weight_decay": "--weight-decay"}
        for saved, group in zip(state["optimizers"][name]["param_groups"], optimizer.param_groups):
            for key, flag in flags.items():
                check(saved[key] == group[key], f"{flag} {group[key]}: the run resumed from {path} was trained with"
                      f" {saved[key]}; pass the original run's flags")
    rows = state["prompts"].get("num_rows", len(prompts.rows))
    check(rows == len(prompts.rows), f"--resume {path}: trained on a task of {rows} training rows, this --task has"
          f" {len(prompts.rows)}: resume with the same --task")
    try:
        for name, model in models.items():  # from_pretrained, then copy: tied weights, sharded files as on the hub
            weights = type(model).from_pretrained(path if name == "policy" else path / name, dtype=torch.float32,
                                                  use_kernels=False)  # every process, for its shard
            set_model_state_dict(model, weights.state_dict(), options=StateDictOptions(full_state_dict=True))
            if state["optimizers"][name]["state"]:  # the first process alone reads the (2x larger) optimizer states
                options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=is_sharded(model))
                set_optimizer_state_dict(model, optimizers[name], state["optimizers"][name] if rank() == 0 else {},
                                         options=options)  # under FSDP it sends each process its shards
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise UserError(f"--resume {path}: does not fit this model and these flags ({_first_line(e)})")
    prompts.load_state_dict(state["prompts"])
    metrics = folder / METRICS_FILE
    if rank() == 0 and metrics.is_file():
        lines, kept = metrics.read_text().splitlines(), []
        for number, line in enumerate(lines, 1):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # the last line may be cut short by the kill; no other
                check(number == len(lines), f"--resume {path}: {metrics} line {number} is no metrics row")
        tmp = metrics.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        _flush_to_disk(tmp)
        tmp.replace(metrics)  # a kill or a crash now leaves either file whole
    rng = state["rng"][rank()]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    print(f"resumed from {path} at step {step}")
    return step, state["extra"]


def log_metrics(save_dir: Optional[str], step: int, metrics: dict, track: bool = False):
    """One JSON line per step in `save_dir`/metrics.jsonl, and to Weights and Biases with --track (rank 0 only)."""
    if track:
        import wandb

        wandb.log(metrics, step=step)
    if save_dir and rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        with open(Path(save_dir) / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


# Rollout -----------------------------------------------------------------------------------------------------------


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
        """Rollouts stacked (DAPO's rounds): prompts left-padded and completions right-padded to the widest."""
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
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    forward = functools.partial(model, use_cache=True, logits_to_keep=1, **{name: cache})
    eos, ended = torch.tensor(eos_ids, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    tokens, entropies, was_training = [], [], model.training
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
        for i in range(max_new_tokens):
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                log_probs = torch.log_softmax(logits / temperature, dim=-1)
                probs = log_probs.exp()
                entropies.append(-(probs * log_probs).sum(dim=-1))
                # inverse CDF: one uniform per row against the float64 cumulative sum, an exact sample of probs
                cdf = probs.cumsum(dim=-1, dtype=torch.float64)
                u = torch.rand(B, 1, dtype=torch.float64, device=device) * cdf[:, -1:]
                token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
            tokens.append(token.masked_fill(ended, tokenizer.pad_token_id))
            ended |= torch.isin(tokens[-1], eos)
            # the last token needs no forward after it; else a host sync per token, and processes stop together
            if i == max_new_tokens - 1 or min_over_processes(int(ended.all()), device):
                break
            mask, position = torch.cat([mask, mask.new_ones(B, 1)], dim=1), position + 1
            logits = forward(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=position).logits
            logits = logits[:, -1].float()
    finally:
        if is_sharded(model):  # back to resharding the layers after each forward, the root kept whole
            model.set_reshard_after_forward(True)
            model.set_reshard_after_forward(False, recurse=False)
            for module in filter(is_sharded, model.modules()):
                module.reshard()
        model.train(was_training)
    completion_ids = torch.stack(tokens, dim=1)
    mask, lengths, truncated = completion_mask(completion_ids, eos_ids)
    entropy = torch.stack(entropies, dim=1) * mask if entropies else torch.zeros_like(mask)
    prompt_ids, prompt_mask = (x.repeat_interleave(group_size, dim=0) for x in (enc.input_ids, enc.attention_mask))
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, mask, lengths, truncated, entropy)
    return rollout.select(torch.arange(B, device=device))  # as wide as this process's longest completion


def completion_logprobs(model, rollout: Rollout, temperature: float, with_entropy: bool = False,
                        chunk_size: int = 256):
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
    lm_head, (B, T, H) = output_layer(model), hidden.shape
    chunks = zip(hidden.reshape(B * T, H).split(chunk_size), input_ids[:, prompt_len:].reshape(B * T).split(chunk_size))
    args = (lm_head.weight, lm_head.bias, temperature, with_entropy)
    if torch.is_grad_enabled():  # the backward recomputes each chunk's logits rather than keeping them
        outs = [checkpoint(_token_logprobs, h, y, *args, use_reentrant=False, preserve_rng_state=False)  # no sampling
                for h, y in chunks]
    else:
        outs = [_token_logprobs(h, y, *args) for h, y in chunks]
    # new tensors, not views: FSDP2 hooks the outputs of a forward for the backward pass
    logp = torch.cat([out[0] for out in outs]).view(B, T).clone()
    return logp, torch.cat([out[1] for out in outs]).view(B, T).clone() if with_entropy else None


def _token_logprobs(hidden, targets, weight, bias, temperature, with_entropy):
    """log softmax(logits / T)[target] and the entropy, for one chunk of tokens, in fp32."""
    # (W h^T)^T, not h W^T: each chunk's weight gradient comes out untransposed and autograd sums them in place
    logits = (weight @ (hidden / temperature).T).T  # 1/T on the narrow side, not on a vocabulary-wide tensor
    if bias is not None:
        logits = logits + bias / temperature
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1) if with_entropy else None
    return log_probs.gather(1, targets[:, None]).squeeze(1), entropy


def per_micro_batch(fn: Callable[[Rollout], torch.Tensor], rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
    """fn on `micro_batch_size` rows at a time (each cut by Rollout.select), right-padded with 0 to the rollout's
    width: (B, T). No forward sees more rows than that."""
    T = rollout.completion_ids.shape[1]
    rows = torch.arange(len(rollout.lengths), device=rollout.lengths.device).split(micro_batch_size)
    return torch.cat([F.pad(out, (0, T - out.shape[1])) for out in (fn(rollout.select(r)) for r in rows)])


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """completion_logprobs of a whole rollout, without gradients, `micro_batch_size` rows per forward: (B, T)."""
    logp = per_micro_batch(lambda part: completion_logprobs(model, part, temperature)[0], rollout, micro_batch_size)
    if is_sharded(model):  # FSDP2 keeps the root gathered for a backward, which a frozen reference never runs
        model.reshard()
    return logp


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    ids, lengths = rollout.completion_ids.tolist(), rollout.lengths.tolist()
    return tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True)
