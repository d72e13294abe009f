"""Run grpo.py unchanged, with timers around its phases; write per-step timings to a JSON file.

    python benchmarks/run_grpo.py --timings-out T.json -- [any grpo.py flags]

Nothing in grpo.py or common.py is edited: this wrapper imports them, replaces a few functions with timed
versions (monkeypatching), then calls `grpo.main(tyro.cli(grpo.Args))` exactly as `python grpo.py` would.

Timed phases of one step (seconds, summed over the calls within the step):
- generate: `common.generate` when sampling (the greedy evaluation calls are timed apart, outside the steps)
- logprob_nograd: `common.completion_logprobs` with gradients off (old policy, and reference when beta > 0)
- train_forward: `common.completion_logprobs` with gradients on (the policy forward of the loss)
- backward: `torch.autograd.backward` (what `loss.backward()` calls)
- clip: `torch.nn.utils.clip_grad_norm_`
- optimizer: `torch.optim.AdamW.step`
A step starts when its sampling `generate` call starts and ends when its last `AdamW.step` returns (or its
gradient clipping, if grpo.py skipped the optimizer step for a non-finite gradient); whatever
is not in a phase above (decoding, rewards, advantages, the loss arithmetic, zero_grad) is `other`.
"""

import inspect
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import tyro  # noqa: E402

import common  # noqa: E402
import grpo  # noqa: E402

steps = []  # one dict per training step
evals = []  # seconds per greedy evaluation (outside the steps)


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # CUDA runs asynchronously; the CPU needs no sync
    return time.perf_counter()


def add(phase: str, seconds: float):
    if steps:
        steps[-1][phase] = steps[-1].get(phase, 0.0) + seconds


def timed_generate(fn):
    signature = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        greedy = bound.get("greedy", False)
        t0 = now()
        rollout = fn(*args, **kwargs)
        t1 = now()
        if greedy:
            evals.append(t1 - t0)
        else:
            steps.append({
                "start": t0,
                "generate": t1 - t0,
                "completions": int(rollout.completion_ids.shape[0]),
                "mean_length": rollout.lengths.float().mean().item(),
                "max_new_tokens": bound["max_new_tokens"],  # asked for: the rollout is cut to its longest row
                "prompt_len": int(rollout.prompt_len),
            })
        return rollout

    return wrapper


def timed_logprobs(fn):
    def wrapper(*args, **kwargs):
        phase = "train_forward" if torch.is_grad_enabled() else "logprob_nograd"
        t0 = now()
        out = fn(*args, **kwargs)
        add(phase, now() - t0)
        return out

    return wrapper


def timed(phase: str, fn, marks_end: bool = False):
    def wrapper(*args, **kwargs):
        t0 = now()
        out = fn(*args, **kwargs)
        t1 = now()
        add(phase, t1 - t0)
        if marks_end and steps:
            steps[-1]["end"] = t1
        return out

    return wrapper


def main():
    argv = sys.argv[1:]
    out = argv[argv.index("--timings-out") + 1]
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []

    common.generate = timed_generate(common.generate)
    common.completion_logprobs = timed_logprobs(common.completion_logprobs)
    torch.autograd.backward = timed("backward", torch.autograd.backward)
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_, marks_end=True)
    torch.optim.AdamW.step = timed("optimizer", torch.optim.AdamW.step, marks_end=True)

    t0 = time.perf_counter()
    grpo.main(tyro.cli(grpo.Args, args=rest))
    wall = time.perf_counter() - t0

    for step in steps:
        step["time"] = step.pop("end") - step.pop("start")
    result = {
        "side": "grpo.py",
        "steps": steps,
        "eval_seconds": evals,
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
    }
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        common.fail(str(e))
