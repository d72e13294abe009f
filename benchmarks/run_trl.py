"""Train with TRL's GRPOTrainer on the same work as grpo.py; write per-step timings to a JSON file.

    python benchmarks/run_trl.py --model DIR --task FILE.jsonl --num-prompts 16 --group-size 16 \
        --max-new-tokens 8 --num-steps 5 --learning-rate 1e-6 --timings-out T.json

Settings that make one TRL step the same work as one grpo.py step (read from trl 1.16.0's grpo_config.py and
grpo_trainer.py and transformers' Trainer loop):
- Batch: per_device_train_batch_size = prompts x group size, gradient_accumulation_steps = 1, so
  steps_per_generation defaults to 1 and generation_batch_size to prompts x group size; num_generations = group
  size makes the RepeatSampler hand each step `prompts` distinct prompts, each repeated `group size` times.
  num_iterations = 1: each rollout batch gets exactly one optimizer step (grpo.py: --update-epochs 1
  --num-minibatches 1), and the whole batch goes through one forward/backward (grpo.py: --micro-batch-size
  = prompts x group size).
- Prompts: the training rows of `tasks.jsonl_task(FILE)`, the very rows grpo.py trains on; the benchmark
  writes exactly `prompts` training rows, so both sides train on the same prompts at every step. They are
  plain strings and the tokenizer has no chat template, so neither side applies one.
- Sampling: temperature 1.0, top_p 1.0, top_k 0, min_p None, repetition_penalty 1.0 (neutral: plain
  softmax sampling, as common.generate), max_completion_length = max new tokens, the model's and the
  tokenizer's EOS ids (TRL, like common.eos_token_ids, stops on both).
- Loss: loss_type "grpo" (seq-mean-token-mean, grpo.py's aggregation), beta 0.0 (no reference model is
  loaded; grpo.py --beta 0 loads none either), epsilon 0.2 (grpo.py --clip-eps), scale_rewards "group"
  (std within the group), mask_truncated_completions False (every completion here is truncated; masking
  them would drop the whole loss).
- Optimizer: AdamW at the same learning rate, weight decay 0, max_grad_norm 1.0, a constant schedule without
  warm-up (grpo.py's learning rate is constant). TRL keeps Trainer's default AdamW implementation
  (`adamw_torch_fused` with torch >= 2.8); the math is AdamW either way.
- Precision and memory: fp32 weights and compute on the CPU (bf16=False, use_cpu), gradient_checkpointing
  False (TRL defaults it to True; grpo.py defaults to False).
- Same seed, no saving, no evaluation, logging every step, report_to "none".
Known differences in how each side does the work (not settings): on the CPU TRL's fused LM head scores every
position of prompt + completion in training, grpo.py only the completion positions. (With one optimizer step
per rollout both skip the no-grad log-prob pass of the sampling policy and use the detached training
log-probs instead.)

Timed phases of one step (seconds): generate (`_generate`: tokenize, sample, decode), score (the rest of
`_generate_and_score_completions`: rewards, advantages), train_forward (`compute_loss`), backward
(`accelerator.backward`), clip (`_clip_grad_norm`), optimizer (between the pre- and post-optimizer-step
callbacks). A step runs from `on_step_begin` to `on_step_end` (the per-step logging that follows is outside it,
as in run_grpo.py).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import tasks  # noqa: E402


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, plus the phases that other wrappers add to `current`."""

    def __init__(self):
        self.steps, self.current, self.t_optimizer = [], None, None

    def add(self, phase, seconds):
        if self.current is not None:
            self.current[phase] = self.current.get(phase, 0.0) + seconds

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = {"start": now()}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.t_optimizer = now()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.add("optimizer", now() - self.t_optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        self.current["time"] = now() - self.current.pop("start")
        self.steps.append(self.current)
        self.current = None


def timed(timer: StepTimer, phase: str, fn, on_result=None):
    def wrapper(*args, **kwargs):
        t0 = now()
        out = fn(*args, **kwargs)
        timer.add(phase, now() - t0)
        if on_result is not None:
            on_result(out)
        return out

    return wrapper


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local folder (save_pretrained) with model and tokenizer")
    parser.add_argument("--task", required=True, help="jsonl file of {prompt, answer} rows (as grpo.py --task jsonl:FILE)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timings-out", required=True, help="JSON file for the per-step timings")
    args = parser.parse_args()
    t_start = time.perf_counter()

    task = tasks.jsonl_task(args.task)  # the same split as grpo.py: train on task.train
    dataset = Dataset.from_list(task.train)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_kernels=False)  # as grpo.py

    def reward_exact(prompts, completions, answer, **kwargs):
        """Any cheap reward does: it does not change the compute. The same exact match as grpo.py's jsonl task."""
        return [tasks.exact_reward(c, a) for c, a in zip(completions, answer)]

    batch = args.num_prompts * args.group_size
    cuda = torch.cuda.is_available()
    output_dir = tempfile.mkdtemp(prefix="trl-bench-")  # nothing is saved there (save_strategy "no")
    config = GRPOConfig(
        output_dir=output_dir,
        seed=args.seed,
        max_steps=args.num_steps,
        # one rollout batch = one optimizer step = one forward/backward over prompts x group size completions
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        num_iterations=1,
        # sampling: plain softmax at temperature 1, every filter neutral
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        # loss: seq-mean-token-mean, no KL, clipped surrogate at 0.2, group-normalised rewards
        loss_type="grpo",
        beta=0.0,
        epsilon=0.2,
        scale_rewards="group",
        mask_truncated_completions=False,
        # optimizer: AdamW, constant learning rate, grad clipping at 1.0
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        # precision and memory: fp32 on the CPU (grpo.py: bf16 autocast on CUDA), no activation checkpointing
        bf16=cuda,
        fp16=False,
        use_cpu=not cuda,
        # (transformers 5 renamed gradient_checkpointing, which TRL defaults to True, to activation_checkpointing)
        **({"activation_checkpointing": False} if "activation_checkpointing" in GRPOConfig.__dataclass_fields__
           else {"gradient_checkpointing": False}),
        # no saving, no evaluation, log every step
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        report_to="none",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_exact, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[timer],
    )
    # sanity: the settings above, as TRL and transformers resolved them
    assert (config.steps_per_generation, config.generation_batch_size) == (1, batch), (
        config.steps_per_generation, config.generation_batch_size)
    assert not config.gradient_checkpointing and config.bf16 == cuda, (config.gradient_checkpointing, config.bf16)

    def record_lengths(out):  # _generate returns (prompt_ids, completion_ids, ...), completions cut after EOS
        lengths = [len(ids) for ids in out[1]]
        timer.add("completions", len(lengths))
        timer.add("mean_length", sum(lengths) / len(lengths))

    trainer._generate = timed(timer, "generate", trainer._generate, record_lengths)
    trainer._generate_and_score_completions = timed(timer, "generate_and_score", trainer._generate_and_score_completions)
    trainer.compute_loss = timed(timer, "train_forward", trainer.compute_loss)
    trainer.accelerator.backward = timed(timer, "backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = timed(timer, "clip", trainer._clip_grad_norm)
    trainer.train()
    wall = time.perf_counter() - t_start
    shutil.rmtree(output_dir, ignore_errors=True)

    for step in timer.steps:
        step["score"] = step.pop("generate_and_score", 0.0) - step.get("generate", 0.0)
        step["max_new_tokens"] = args.max_new_tokens
    result = {"side": "TRL", "steps": timer.steps, "wall_seconds": wall, "torch_threads": torch.get_num_threads()}
    Path(args.timings_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
