"""Benchmark grpo.py against TRL's GRPOTrainer on identical work; optionally grpo.py's scaling.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench.py                      # both configs, 3 alternating repeats per side
    python benchmarks/bench.py --config tiny --repeats 1 --steps 3     # a quick check
    python benchmarks/bench.py --config qwen-shape --scaling           # plus grpo.py's scaling table

Each run is its own child process (run_grpo.py: grpo.py unchanged, with timers; run_trl.py: GRPOTrainer),
run one at a time and alternating (grpo.py, TRL, grpo.py, TRL, ...). Peak resident memory is the child's
ru_maxrss from os.wait4. This parent process never imports torch: on Linux a child's ru_maxrss starts from
the RSS of the process that forked it, so a large parent would inflate every child's peak; the models are
built and the matmul rate is measured in (spawned) child processes too.

Identical work on both sides (see run_trl.py for TRL's side, setting by setting):
- the same local, randomly initialised model (seed 0) and tokenizer, loaded from one folder, fp32 on the CPU;
- the same prompts: the task file has exactly `prompts` training rows (plus one held-out row that only
  grpo.py's start and end evaluation reads), all of the same length, so every step trains on the same prompts;
- prompts x group size completions per step, sampled at temperature 1 with no top-k/top-p/min-p/repetition
  penalty, one optimizer step per rollout batch over one forward/backward of the whole batch, no KL (beta 0,
  no reference model), seq-mean-token-mean loss, clip 0.2, AdamW at the same constant learning rate, clip norm 1;
- the same completion length: every completion runs to the maximum, because the EOS id is one the model
  cannot emit (see make_model). The measured mean completion length of each side is printed and checked.
The first step of every run is warm-up and is discarded; a run's step time is the median of the others.

Threads: children inherit the environment; set OMP_NUM_THREADS to pin the thread count (the default is one
thread per core). The matmul rate for the floor is measured under the same setting. Both sides run with glibc's
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ raised (child_env), unless the environment sets them.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TINY_MODEL = ROOT / "assets" / "tiny-llama"
LEARNING_RATE = 1e-6
SEED = 1

# The two configurations. Architecture fields are Qwen2 config fields.
CONFIGS = {
    # the shipped tiny model's architecture (char tokenizer, 98 ids), randomly initialised
    "tiny": dict(prompts=16, group_size=16, max_new_tokens=8, steps=20, arch="tiny"),
    # Qwen2.5-0.5B's shapes with 2 layers, randomly initialised
    "qwen-shape": dict(
        prompts=4, group_size=8, max_new_tokens=64, steps=5,
        arch=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
}
# grpo.py alone on qwen-shape: (group size, new tokens), 4 prompts each
SCALING = [(4, 64), (8, 64), (16, 64), (8, 32), (8, 128)]
# The matmul whose rate sets the floor: (N x 896) @ (896 x 151936), qwen-shape's output projection, for these N
# (32 = qwen-shape's decode batch; 256 is large enough to reach this machine's peak), with each kernel
MATMUL_SHAPE = (896, 151936)
MATMUL_ROWS = [32, 256]

# Phases in the split tables: (key in the runners' JSON, label)
PHASES = [
    ("generate", "generation (sampling)"),
    ("score", "rewards and advantages"),
    ("logprob_nograd", "log-prob pass, no grad (old policy)"),
    ("train_forward", "training forward"),
    ("backward", "training backward"),
    ("clip", "gradient clipping"),
    ("optimizer", "optimizer step"),
]


# ----------------------------------------------------------------------------------------------
# Model, tokenizer and prompts (built in a child process)
# ----------------------------------------------------------------------------------------------


def make_model(arch, out: str) -> dict:
    """A randomly initialised Qwen2 causal LM (seed 0) and a tokenizer whose EOS the model cannot emit.

    The EOS id is `vocab_size`, one past the model's last id: the model's softmax has no entry for it, so
    sampling never ends a completion early and every completion runs to max_new_tokens, on both sides, with
    the model's distribution over its real ids untouched. Both trainers take their stop ids from the model's
    generation_config and the tokenizer's EOS (common.eos_token_ids; GRPOTrainer.__init__), so both get it.
    config.json keeps eos_token_id None, because transformers warns about an id outside the vocabulary there.
    The tokenizer is the tiny model's character tokenizer (ids 0..97, pad 0) plus that EOS; for qwen-shape
    the model's ids 98..151935 have no text: decoding skips them (checked; neither trainer fails on them).
    """
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY_MODEL) if arch == "tiny" else Qwen2Config(**arch)
    eos = config.vocab_size
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, None, 0
    config.use_cache = True
    model = AutoModelForCausalLM.from_config(config).float()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=eos, pad_token_id=0)
    model.save_pretrained(out)

    spec = json.loads((TINY_MODEL / "tokenizer.json").read_text())
    assert "<|eos|>" not in spec["model"]["vocab"] and max(spec["model"]["vocab"].values()) < eos
    spec["model"]["vocab"]["<|eos|>"] = eos
    spec["added_tokens"].append({"id": eos, "content": "<|eos|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                        eos_token="<|eos|>", pad_token="<|endoftext|>", unk_token="<unk>")
    assert tokenizer.eos_token_id == eos and tokenizer.pad_token_id == 0
    tokenizer.save_pretrained(out)
    return dict(parameters=sum(p.numel() for p in model.parameters()), eos_id=eos, vocab_size=config.vocab_size)


def write_task(path: Path, prompts: int):
    """`prompts` + 1 rows "a+b=" (4 characters = 4 tokens each). tasks.jsonl_task holds out max(1, n // 10)
    rows, which is 1 here for up to 19 prompts: the rest, exactly `prompts` rows, is the training set of both
    sides. The held-out row keeps grpo.py's start and end evaluation (greedy, outside the steps) cheap."""
    assert prompts + 1 < 20
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 10) for b in range(1, 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[: prompts + 1]))


# ----------------------------------------------------------------------------------------------
# The floor: matmul FLOPs of one step and the machine's fp32 matmul rate
# ----------------------------------------------------------------------------------------------


def step_flops(arch: dict, completions: int, prompt_len: int, new_tokens: int) -> dict:
    """Matmul FLOPs of one GRPO step (a multiply-add = 2 FLOPs); B sequences of P prompt + T completion tokens.

    Per token and layer, the linear layers cost 2 * W FLOPs forward, W = H*H (q) + 2*H*kv (k, v) + H*H (o)
    + 3*H*I (gate, up, down), kv = H / heads * kv_heads; attention adds 4*H*c (QK^T and AV over c context
    positions), 2*H*n*(n+1) summed over a sequence of n tokens. The output projection costs 2*H*V per scored
    position. Backward costs twice the forward; recomputation (activation checkpointing) is not counted.
    - generation: the prefill scores only the last prompt position, then every new token but the last is fed
      back: layers over P + T - 1 positions, the output projection over T positions, per sequence;
    - training forward + backward: 3x the forward over P + T - 1 positions (the last predicts nothing), the
      output projection only over the T completion positions (the minimum; TRL's fused head on the CPU scores
      all P + T - 1). grpo.py's own count is higher: its LM head chunks run under activation checkpointing, so
      the backward recomputes their forward, 4x instead of 3x;
    - no-grad log-prob pass: 1x the same forward, for the sampling policy's log-probs. With one optimizer step
      per rollout they equal the training forward's (ratio 1): grpo.py and TRL both skip it then, and the floor
      leaves it out.
    qwen-shape (H 896, I 4864, 14 heads, 2 KV heads -> kv 128, V 151,936, L 2), B 32, P 4, T 64:
      W = 802,816 + 229,376 + 802,816 + 13,074,432 = 14,909,440;  2*H*V = 272,269,312
      attention over a sequence of n tokens, 2 layers: 2 * 2 * 896 * n * (n + 1): 16.3 M for n = 67, 16.8 M for 68
      generation: head 272.27M * 32 * 64 = 557.61 G; layers 2 * 2 * 14.909M * 32 * 67 = 127.86 G + 0.52 G attention
      training:   head 3 * 557.61 G = 1672.82 G; layers 3 * 128.39 G = 385.16 G (the same 67 positions)
      floor = 557.61 + 128.39 + 1672.82 + 385.16 = 2743.98 GFLOP;  no-grad pass: 557.61 + 128.39 = 686.00 GFLOP
    (The prompts are 4 tokens; the tiny config is the same formula with H 128, I 512, 4 heads, V 98, B 256, T 8.)
    Every sequence's prompt positions count, as TRL runs them; grpo.py prefills a prompt once per group in
    generation, so its generation FLOPs are a little lower than counted.
    """
    H, I, V, L = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"], arch["num_hidden_layers"]
    kv = H // arch["num_attention_heads"] * arch["num_key_value_heads"]
    W = H * H + 2 * H * kv + H * H + 3 * H * I
    B, P, T = completions, prompt_len, new_tokens
    head = 2 * H * V

    def layers_forward(positions):  # one sequence of `positions` tokens through all layers, causal attention
        return L * (2 * W * positions + 2 * H * positions * (positions + 1))

    parts = {
        "generation: output projection": head * B * T,
        "generation: layers": B * layers_forward(P + T - 1),
        "training fwd+bwd: output projection": 3 * head * B * T,
        "training fwd+bwd: layers": 3 * B * layers_forward(P + T - 1),
    }
    nograd = head * B * T + B * layers_forward(P + T - 1)
    return dict(parts=parts, floor=sum(parts.values()), nograd=nograd)


def matmul_rate(hidden: int, vocab: int, rows: list[int], repeats: int = 3) -> dict:
    """fp32 GFLOP/s of (N x H) @ (H x V), the output projection's shape, best of `repeats`, for each N."""
    import torch

    weight = torch.randn(vocab, hidden) * 0.02  # stored (V, H) like the model's nn.Linear / tied embedding
    rates = {}
    for n in rows:
        x = torch.randn(n, hidden)
        torch.matmul(x, weight.t())  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(x, weight.t())
            best = min(best, time.perf_counter() - t0)
        rates[("torch.matmul", n)] = 2 * n * hidden * vocab / best / 1e9
    return dict(rates=rates, threads=torch.get_num_threads(), torch=torch.__version__)


def in_child(fn, *args):
    """Run fn(*args) in a fresh (spawned) Python process and return its result: keeps torch out of the parent."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def child_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # both sides: glibc keeps freed blocks of up to 32 MiB for reuse instead of unmapping them each step
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))
    return env


def run_child(command: list[str], log: Path, timings: Path) -> dict:
    """Run one training child; return its timings JSON plus the peak RSS (os.wait4's ru_maxrss, KB on Linux)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or not timings.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"run failed (exit {process.returncode}): {' '.join(command)}\n--- {log} (tail) ---\n{tail}")
    result = json.loads(timings.read_text())
    result["peak_rss_gib"] = usage.ru_maxrss / 1024**2
    result["process_seconds"] = time.perf_counter() - t0
    return result


def run_ours(model: Path, task: Path, prompts: int, group: int, tokens: int, steps: int, work: Path, tag: str):
    timings = work / f"{tag}.json"
    command = [sys.executable, str(HERE / "run_grpo.py"), "--timings-out", str(timings), "--",
               "--model", str(model), "--task", f"jsonl:{task}", "--num-prompts", str(prompts),
               "--group-size", str(group), "--max-new-tokens", str(tokens), "--num-steps", str(steps),
               "--beta", "0", "--learning-rate", str(LEARNING_RATE), "--temperature", "1",
               "--eval-every", "0", "--seed", str(SEED), "--update-epochs", "1", "--num-minibatches", "1",
               # one forward/backward over the whole batch, as TRL does (the `paper` preset would use 8)
               "--micro-batch-size", str(prompts * group)]
    return run_child(command, work / f"{tag}.log", timings)


def run_trl(model: Path, task: Path, prompts: int, group: int, tokens: int, steps: int, work: Path, tag: str):
    timings = work / f"{tag}.json"
    command = [sys.executable, str(HERE / "run_trl.py"), "--timings-out", str(timings),
               "--model", str(model), "--task", str(task), "--num-prompts", str(prompts),
               "--group-size", str(group), "--max-new-tokens", str(tokens), "--num-steps", str(steps),
               "--learning-rate", str(LEARNING_RATE), "--seed", str(SEED)]
    return run_child(command, work / f"{tag}.log", timings)


def measured(run: dict) -> list[dict]:
    """The steps that count: all but the first (warm-up)."""
    steps = run["steps"][1:]
    if not steps:
        sys.exit("need at least 2 steps per run (the first is discarded as warm-up)")
    return steps


def run_summary(run: dict) -> dict:
    steps = measured(run)
    time_ = statistics.median(s["time"] for s in steps)
    tokens = statistics.median(s["completions"] * s["mean_length"] for s in steps)
    return dict(time=time_, tokens_per_sec=tokens / time_, peak=run["peak_rss_gib"],
                mean_length=statistics.mean(s["mean_length"] for s in run["steps"]),
                min_length=min(s["mean_length"] for s in run["steps"]), max_new_tokens=run["steps"][0]["max_new_tokens"])


def side_summary(runs: list[dict]) -> dict:
    """Median over runs of each run's value, with the range over runs."""
    per_run = [run_summary(r) for r in runs]
    out = {}
    for key in ("time", "tokens_per_sec", "peak"):
        values = [p[key] for p in per_run]
        out[key] = (statistics.median(values), min(values), max(values))
    out["mean_length"] = statistics.mean(p["mean_length"] for p in per_run)
    out["full_length"] = all(p["min_length"] == p["max_new_tokens"] for p in per_run)
    out["max_new_tokens"] = per_run[0]["max_new_tokens"]
    out["runs"], out["steps"] = len(runs), sum(len(measured(r)) for r in runs)
    # the split uses means over all measured steps, so that the phases add up to the step
    out["split"] = {k: statistics.mean(s.get(k, 0.0) for r in runs for s in measured(r)) for k, _ in PHASES}
    out["split_total"] = statistics.mean(s["time"] for r in runs for s in measured(r))
    return out


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def fmt(value: tuple, digits: int, runs: int) -> str:
    median, low, high = value
    text = f"{median:.{digits}f}"
    return text if runs == 1 else f"{text} ({low:.{digits}f}-{high:.{digits}f})"


def comparison_table(results: dict) -> str:
    lines = [
        "| config | side | median step time (s) | completion tokens/s | peak resident memory (GiB) "
        "| mean completion length | share of the matmul floor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        c, n = CONFIGS[name], r["ours"]["runs"]
        label = f"{name} ({c['prompts']} x {c['group_size']}, {c['max_new_tokens']} tokens)"
        for side, key in (("grpo.py", "ours"), ("TRL", "trl")):
            s = r[key]
            length = f"{s['mean_length']:.2f} of {s['max_new_tokens']}" + ("" if s["full_length"] else " (SHORT!)")
            floor = f"{r['floor_seconds'] / s['time'][0]:.0%}"
            lines.append(f"| {label} | {side} | {fmt(s['time'], 2, n)} | {fmt(s['tokens_per_sec'], 0, n)} "
                         f"| {fmt(s['peak'], 2, n)} | {length} | {floor} |")
        o, t = r["ours"], r["trl"]
        lines.append(f"| {label} | **grpo.py / TRL** | **{o['time'][0] / t['time'][0]:.2f}** "
                     f"| **{o['tokens_per_sec'][0] / t['tokens_per_sec'][0]:.2f}** "
                     f"| **{o['peak'][0] / t['peak'][0]:.2f}** | | |")
    return "\n".join(lines)


def split_table(name: str, r: dict) -> str:
    lines = [f"Time split of one step, {name} (mean seconds per phase over all measured steps):", "",
             "| phase | grpo.py | TRL |", "| --- | --- | --- |"]
    for key, label in PHASES:
        cells = []
        for side in ("ours", "trl"):
            s = r[side]
            measured_here = key != "score" or side == "trl"  # grpo.py's rewards sit in "other"
            if side == "trl" and key == "logprob_nograd":
                cells.append("skipped")
            elif not measured_here:
                cells.append("(in other)")
            else:
                cells.append(f"{s['split'][key]:.3f} ({s['split'][key] / s['split_total']:.0%})")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    cells = []
    for side in ("ours", "trl"):
        s = r[side]
        other = s["split_total"] - sum(s["split"].values())
        cells.append(f"{other:.3f} ({other / s['split_total']:.0%})")
    lines.append(f"| other (decode, loss arithmetic, bookkeeping) | {cells[0]} | {cells[1]} |")
    lines.append(f"| **step** | **{r['ours']['split_total']:.3f}** | **{r['trl']['split_total']:.3f}** |")
    return "\n".join(lines)


def floor_table(name: str, r: dict) -> str:
    f, rate = r["flops"], r["rate"]
    rates = ", ".join(f"{v:.1f} GFLOP/s with {kernel} at N = {n}" for (kernel, n), v in rate["rates"].items())
    hidden, vocab = MATMUL_SHAPE
    lines = [f"Matmul floor, {name}: the step's matmul FLOPs at the machine's best fp32 matmul rate; (N x {hidden}) "
             f"@ ({hidden} x {vocab}) runs at {rates} ({rate['threads']} threads).", "",
             "| part of one step | GFLOP |", "| --- | --- |"]
    lines += [f"| {part} | {v / 1e9:.2f} |" for part, v in f["parts"].items()]
    lines.append(f"| **floor (sum)** | **{f['floor'] / 1e9:.2f}**, {r['floor_seconds']:.2f} s at "
                 f"{r['best_rate']:.1f} GFLOP/s |")
    lines.append(f"| not in the floor: no-grad log-prob pass (run only off-policy; skipped here by both) "
                 f"| {f['nograd'] / 1e9:.2f} |")
    # the same FLOPs at the rates this machine reaches for their shapes: generation's output projection has
    # one row per sequence (N = completions), everything else runs at the best measured rate
    if r["arch"]["vocab_size"] != vocab:  # the rates were measured on qwen-shape's output projection
        lines += ["", "The rates are those of qwen-shape's output projection; this model's narrow matmuls run "
                      "slower, so its floor is optimistic and its share of the floor a rough figure."]
        return "\n".join(lines)
    completions = r["completions"]
    head_rate = max((v for (_, n), v in rate["rates"].items() if n == completions), default=r["best_rate"])
    generation_head = f["parts"]["generation: output projection"] / 1e9
    bound = generation_head / head_rate + (f["floor"] / 1e9 - generation_head) / r["best_rate"]
    lines += ["", f"At these rates no exact fp32 step can take less than {bound:.2f} s: generation's output projection "
                  f"({generation_head:.2f} GFLOP) runs with N = {completions} rows at {head_rate:.1f} GFLOP/s, the "
                  f"rest at {r['best_rate']:.1f} GFLOP/s, with no other cost."]
    return "\n".join(lines)


def scaling_table(rows: list) -> str:
    prompts = CONFIGS["qwen-shape"]["prompts"]
    lines = [f"grpo.py alone, qwen-shape, {prompts} prompts (median step time and peak memory over runs; mean "
             f"seconds per phase):", "",
             "| group size | new tokens | completions | step time (s) | completion tokens/s | peak memory (GiB) "
             "| generation | no-grad log-probs | training fwd+bwd | optimizer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for group, tokens, s in rows:
        sp = s["split"]
        lines.append(f"| {group} | {tokens} | {prompts * group} | {s['time'][0]:.2f} | {s['tokens_per_sec'][0]:.0f} "
                     f"| {s['peak'][0]:.2f} | {sp['generate']:.2f} | {sp['logprob_nograd']:.2f} "
                     f"| {sp['train_forward'] + sp['backward']:.2f} | {sp['optimizer']:.2f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    threads = os.environ.get("OMP_NUM_THREADS", "default (one per core)")
    malloc = ", ".join(f"{k}={v}" for k, v in child_env().items() if k.startswith("MALLOC_"))
    return (f"{cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS {threads}, {malloc}; Python {platform.python_version()}, "
            f"torch {version('torch')}, transformers {version('transformers')}, trl {version('trl')}")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def prepare(name: str, work: Path) -> tuple[Path, Path, dict]:
    c = CONFIGS[name]
    model = work / f"model-{name}"
    info = in_child(make_model, c["arch"], str(model))
    task = work / f"task-{name}.jsonl"
    write_task(task, c["prompts"])
    arch = json.loads((model / "config.json").read_text())
    print(f"[{name}] model: {info['parameters'] / 1e6:.1f}M parameters, vocab {info['vocab_size']}, "
          f"EOS id {info['eos_id']} (outside the model's ids), random init", flush=True)
    return model, task, arch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "qwen-shape", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating grpo.py and TRL")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run, the first discarded (default: 20 for tiny, 5 for qwen-shape)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="run the grpo.py vs TRL comparison")
    parser.add_argument("--scaling", action="store_true",
                        help="also run grpo.py alone on qwen-shape at group size 4/8/16 and 32/64/128 new tokens")
    parser.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                        help="print the per-phase time split of a step")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="markdown file for the tables")
    parser.add_argument("--work-dir", default=None, help="where models, logs and timings go (default: a temp dir)")
    args = parser.parse_args()
    names = ["tiny", "qwen-shape"] if args.config == "all" else [args.config]
    if args.scaling and "qwen-shape" not in names:
        names.append("qwen-shape")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="grpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\nwork dir: {work}", flush=True)
    t_start = time.perf_counter()

    results, scaling, report = {}, [], []
    for name in names:
        c = CONFIGS[name]
        model, task, arch = prepare(name, work)
        steps = args.steps or c["steps"]
        if args.compare and (args.config in (name, "all")):
            B = c["prompts"] * c["group_size"]
            ours, trl = [], []
            for i in range(args.repeats):
                for side, runner, runs in (("grpo.py", run_ours, ours), ("TRL", run_trl, trl)):
                    tag = f"{name}-{'ours' if runner is run_ours else 'trl'}-{i + 1}"
                    run = runner(model, task, c["prompts"], c["group_size"], c["max_new_tokens"], steps, work, tag)
                    runs.append(run)
                    s = run_summary(run)
                    print(f"[{name}] run {i + 1}/{args.repeats} {side:8s} median step {s['time']:.3f} s, "
                          f"{s['tokens_per_sec']:.0f} tok/s, peak {s['peak']:.2f} GiB, mean length "
                          f"{s['mean_length']:.2f} of {s['max_new_tokens']}, process {run['process_seconds']:.0f} s",
                          flush=True)
            prompt_len = ours[0]["steps"][0]["prompt_len"]
            flops = step_flops(arch, B, prompt_len, c["max_new_tokens"])
            results[name] = dict(
                ours=side_summary(ours), trl=side_summary(trl), flops=flops, arch=arch, completions=B
            )
        if args.scaling and name == "qwen-shape":
            for group, tokens in SCALING:
                runs = []
                for i in range(args.repeats):
                    run = run_ours(model, task, c["prompts"], group, tokens, steps, work, f"scaling-g{group}-t{tokens}-{i + 1}")
                    runs.append(run)
                    s = run_summary(run)
                    print(f"[scaling] group {group}, {tokens} tokens, run {i + 1}/{args.repeats}: median step "
                          f"{s['time']:.3f} s, peak {s['peak']:.2f} GiB", flush=True)
                scaling.append((group, tokens, side_summary(runs)))

    if results:  # the machine's fp32 matmul rate
        rate = in_child(matmul_rate, *MATMUL_SHAPE, MATMUL_ROWS)
        for r in results.values():
            r["rate"], r["best_rate"] = rate, max(rate["rates"].values())
            r["floor_seconds"] = r["flops"]["floor"] / (r["best_rate"] * 1e9)

    report.append(f"Machine: {machine()}.")
    steps = args.steps or " / ".join(f"{CONFIGS[n]['steps']} ({n})" for n in names)
    report.append(f"Settings: learning rate {LEARNING_RATE}, seed {SEED}, temperature 1, beta 0, loss "
                  f"seq-mean-token-mean, fp32 on the CPU, {args.repeats} alternating run(s) per side of {steps} "
                  f"steps, the first step of each run discarded; values are medians over runs (range over runs in "
                  f"parentheses). Every reward is 0 here (random text never matches the answer), so advantages and "
                  f"gradients are zero-valued; the compute is the same dense work as with informative rewards.")
    if results:
        report.append(comparison_table(results))
        for name, r in results.items():
            report.append(floor_table(name, r))
            if args.split:
                report.append(split_table(name, r))
        short = [f"{n} {side}" for n, r in results.items() for side in ("ours", "trl") if not r[side]["full_length"]]
        if short:
            report.append("WARNING: some completions ended before max_new_tokens in: " + ", ".join(short)
                          + "; the two sides did not do identical work.")
    if scaling:
        report.append(scaling_table(scaling))
    flags, skip = [], False  # the command line, without where files go
    for a in sys.argv[1:]:
        if not skip and a.split("=")[0] not in ("--out", "--work-dir"):
            flags.append(a)
        skip = a in ("--out", "--work-dir")
    flags = " ".join(flags)
    report.append(f"Reproduce: `pip install -r requirements.txt -r benchmarks/requirements.txt && "
                  f"python benchmarks/bench.py{' ' + flags if flags else ''}` "
                  f"(took {(time.perf_counter() - t_start) / 60:.0f} min).")
    text = "\n\n".join(report) + "\n"
    print("\n" + text)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
