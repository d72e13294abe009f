"""Counts that carry over to a GPU, measured on the CPU in bf16: grpo.py against TRL's GRPOTrainer on qwen-shape.

    python benchmarks/counts.py            # both sides, then grpo.py under torchrun with 2 processes

Times on a CPU say little about an H100, but these counts do not depend on the device:
- KV-cache bytes per token: the keys and values stored per decoded token of one sequence, all layers (their
  dtype is the compute dtype only when the cache is built from bf16 keys and values);
- padded positions per step: positions the training forward runs whose token is padding (left of a prompt, or
  after a completion's EOS), summed over one step's micro-batches;
- rows per no-grad forward: the largest batch any forward outside generation sees (old and reference log-probs);
- all-gathers per rollout (grpo.py, 2 processes): FSDP2 collectives during one `generate` call.

Identical work on both sides: Qwen2.5-0.5B's shapes with 2 layers, randomly initialised (seed 0); 4 prompts x 8
completions, up to 64 new tokens, micro-batches of 8, two passes over each rollout batch (so the old log-probs are
needed), beta 0.04 (so the reference's are too), bf16. So that completions end at different lengths, as real ones
do, the EOS row of the tied embedding points along the mean final hidden state, scaled by bisection toward a mean
length of 20 tokens on a calibration prompt (`make_model`); the measured prompts end at other lengths, which the
table reports. Both sides sample from that same model.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

PROMPTS, GROUP, TOKENS, MICRO, STEPS = 4, 8, 64, 8, 2


def make_model(out: Path):
    """qwen-shape, random, with an EOS (id 0, the tiny tokenizer's) that ends sampled completions of the calibration
    prompt `12+34=` after about 20 tokens: its row of the tied embedding points along the mean final hidden state
    of a sampled rollout, scaled by bisection on the mean length of sampled rollouts."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    import common
    from bench import CONFIGS

    torch.manual_seed(0)
    config = Qwen2Config(**CONFIGS["qwen-shape"]["arch"], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = common.prepare(Qwen2ForCausalLM(config), gradient_checkpointing=False, trainable=False)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny-llama", padding_side="left")
    weight = model.get_output_embeddings().weight
    prompts = ["12+34="] * 4
    with torch.no_grad():
        weight[0] = 0.0
        rollout = common.generate(model, tokenizer, prompts, 4, TOKENS, 1.0, [0])
        hidden = model.model(rollout.input_ids).last_hidden_state[:, rollout.prompt_len - 1 :].flatten(0, 1)
        direction = hidden.mean(0) / hidden.mean(0).norm()
        low, high = 0.0, 4.0
        for _ in range(8):
            weight[0] = (low + high) / 2 * direction
            length = common.generate(model, tokenizer, prompts, 4, TOKENS, 1.0, [0]).lengths.float().mean()
            low, high = ((low + high) / 2, high) if length > 20 else (low, (low + high) / 2)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def counters():
    """Patches shared by both sides: the KV cache's bytes per token, and the rows of every forward."""
    import torch
    from transformers import cache_utils

    counts = dict(kv_bytes_per_token=None, kv_dtype=None, nograd_rows=0, generating=False)
    update, layers = cache_utils.Cache.update, {}

    def recording_update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # (batch, heads, tokens, head dim): one token of one sequence holds heads x head dim keys and as many values
        layers[layer_idx] = (key_states.element_size() * key_states.shape[1] * key_states.shape[3]
                             + value_states.element_size() * value_states.shape[1] * value_states.shape[3])
        counts["kv_bytes_per_token"], counts["kv_dtype"] = sum(layers.values()), str(key_states.dtype)
        return update(self, key_states, value_states, layer_idx, *args, **kwargs)

    cache_utils.Cache.update = recording_update

    def rows(module, inputs):
        if isinstance(module, torch.nn.Embedding) and inputs and not torch.is_grad_enabled() and not counts["generating"]:
            counts["nograd_rows"] = max(counts["nograd_rows"], inputs[0].shape[0])

    torch.nn.modules.module.register_module_forward_pre_hook(rows)
    return counts


def run_ours(model: Path, task: Path) -> dict:
    import torch

    import common
    import grpo

    counts, padded, lengths = counters(), [], []
    generate, logprobs = common.generate, common.completion_logprobs

    def counted_generate(*args, greedy=False, **kwargs):
        counts["generating"] = True
        try:
            rollout = generate(*args, greedy=greedy, **kwargs)
        finally:
            counts["generating"] = False
        if not greedy:  # a training step starts with its rollout
            padded.append(0)
            lengths.append(rollout.lengths.float().mean().item())
        return rollout

    def counted_logprobs(model, rollout, *args, **kwargs):
        if torch.is_grad_enabled():  # the training forward runs every position but the last
            mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)[:, :-1]
            padded[-1] += int(mask.numel() - mask.sum())
        return logprobs(model, rollout, *args, **kwargs)

    common.generate, common.completion_logprobs = counted_generate, counted_logprobs
    grpo.main(grpo.Args(model=str(model), task=f"jsonl:{task}", num_prompts=PROMPTS, group_size=GROUP,
                        max_new_tokens=TOKENS, micro_batch_size=MICRO, update_epochs=2, beta=0.04, num_steps=STEPS,
                        eval_every=0, precision="bf16", learning_rate=1e-6))
    return dict(counts, padded_per_step=padded, mean_length=lengths)


def run_trl(model: Path, task: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import tasks

    counts, padded, lengths = counters(), [], []
    rows = tasks.jsonl_task(str(task)).train
    trainer_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, use_kernels=False)  # as grpo.py

    def training_forward(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if torch.is_grad_enabled() and mask is not None:
            padded[-1] += int(mask.numel() - mask.sum())

    trainer_model.model.register_forward_pre_hook(training_forward, with_kwargs=True)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-counts-"), seed=1, max_steps=STEPS * 2,  # 2 optimizer steps a rollout
        per_device_train_batch_size=MICRO, gradient_accumulation_steps=PROMPTS * GROUP // MICRO,
        num_generations=GROUP, num_iterations=2, max_completion_length=TOKENS, temperature=1.0, top_p=1.0, top_k=0,
        min_p=None, repetition_penalty=1.0, loss_type="grpo", beta=0.04, learning_rate=1e-6,
        lr_scheduler_type="constant", bf16=True, use_cpu=True, save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True, **({"activation_checkpointing": False}
                                               if "activation_checkpointing" in GRPOConfig.__dataclass_fields__
                                               else {"gradient_checkpointing": False}),
    )
    trainer = GRPOTrainer(model=trainer_model, reward_funcs=lambda completions, answer, **kw: [
        tasks.exact_reward(c, a) for c, a in zip(completions, answer)], args=config,
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model, padding_side="left"))
    generate = trainer._generate

    def flagged_generate(*args, **kwargs):
        counts["generating"] = True
        padded.append(0)
        try:
            out = generate(*args, **kwargs)
        finally:
            counts["generating"] = False
        lengths.append(sum(len(ids) for ids in out[1]) / len(out[1]))
        return out

    trainer._generate = flagged_generate
    trainer.train()
    return dict(counts, padded_per_step=padded, mean_length=lengths)


def count_all_gathers(model: str):
    """Under torchrun: FSDP2 all-gathers during one sampling `generate` call of 2 prompts x 8, 64 new tokens."""
    import torch

    import common

    common.init_distributed(torch.device("cpu"))
    sharded = common.load_model(model, torch.device("cpu"), torch.bfloat16)
    tokenizer = common.load_tokenizer(model)
    calls, gather = [], torch.distributed.all_gather_single

    def counted(*args, **kwargs):
        calls.append(1)
        return gather(*args, **kwargs)

    torch.distributed.all_gather_single = counted
    torch.manual_seed(0)
    rollout = common.generate(sharded, tokenizer, ["1+2="] * 2, 8, TOKENS, 1.0, common.eos_token_ids(sharded, tokenizer))
    if common.rank() == 0:
        print("ALLGATHERS", len(calls), rollout.completion_ids.shape[1], sum(map(common.is_sharded, sharded.modules())))
    common.finish_distributed()


def all_gathers(model: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             __file__, "allgathers", str(model)], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = [x for x in result.stdout.splitlines() if x.startswith("ALLGATHERS")]
    if not line:
        sys.exit(result.stderr[-3000:])
    calls, tokens, modules = map(int, line[0].split()[1:])
    return dict(all_gathers=calls, decoded_tokens=tokens, sharded_modules=modules)


def main():
    if sys.argv[1:2] == ["allgathers"]:  # under torchrun
        return count_all_gathers(sys.argv[2])
    if len(sys.argv) == 4:  # a child: one side
        side, model, task = sys.argv[1:]
        result = (run_ours if side == "grpo" else run_trl)(Path(model), Path(task))
        print("RESULT " + json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="counts-"))
    model, task = work / "model", work / "task.jsonl"
    make_model(model)
    from bench import write_task

    write_task(task, PROMPTS)
    results = {}
    for side in ("grpo", "trl"):
        out = subprocess.run([sys.executable, __file__, side, str(model), str(task)], capture_output=True, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"), cwd=ROOT)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(line[0][len("RESULT "):])
    results["grpo"].update(all_gathers(model))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
