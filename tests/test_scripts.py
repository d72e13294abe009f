"""The scripts as a user runs them: short end-to-end runs in a subprocess, and bad input."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["grpo.py", "dapo.py", "gspo.py", "gfpo.py", "ppo.py"]


ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
# plumbing tests: 4 prompts a step (ppo's preset has 128) and 8 new tokens (the preset's 40) keep the suite quick
SMALL = ["--num-prompts", "4", "--max-new-tokens", "8"]


def command(script, *args):
    return [sys.executable, str(ROOT / script), *args]


def run(script, *args, cwd=None, timeout=600):
    return subprocess.run(command(script, *args), capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_steps_train_save_and_load_back(script, tmp_path):
    # run from another working directory: the embedded default must not depend on it
    result = run(script, "--num-steps", "2", "--eval-every", "0", "--save-dir", str(tmp_path / "ckpt"), *SMALL,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"step \d+: reward \S+\s+loss (\S+)", result.stdout)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "step_2")
    AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "step_2")
    initial = AutoModelForCausalLM.from_pretrained(common.TINY_MODEL)
    changed = [not torch.equal(a, b) for a, b in zip(saved.parameters(), initial.parameters())]
    assert any(changed)


def write(path, text):
    path.write_text(text)
    return str(path)


# flags every script shares; each script's own flags are checked in its own test file
BAD_INPUT = [
    (["--model", "/no/such/model"], "--model /no/such/model: no such folder"),
    (["--device", "gpu"], "--device gpu: not one of auto, cpu, cuda, cuda:N"),
    (["--device", "mps"], "--device mps: not one of auto, cpu, cuda, cuda:N"),  # a device, but not one we run on
    (["--task", "poetry"], "--task"),
    (["--task", "jsonl:/no/such/file.jsonl"], "file not found"),
    (["--task", "jsonl:{bad_rows}"], "line 2"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--learning-rate", "-1e-5"], "--learning-rate"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-minibatches", "3"], "--num-minibatches"),  # e.g. grpo's 16 x 16 = 256 completions do not split in 3
    (["--micro-batch-size", "100"], "--micro-batch-size"),  # 100 divides none of the scripts' minibatches
    (["--keep-last", "-1"], "--keep-last"),
    (["--max-skipped", "0"], "--max-skipped"),
    (["--save-every", "1"], "--save-every 1: needs --save-dir"),  # else nothing would be saved, without a word
    (["--micro-batch-size", "0"], "--micro-batch-size 0: must divide"),  # not a silent "the whole minibatch"
    (["--save-dir", "{bad_rows}"], "--save-dir {bad_rows}: cannot create the folder"),  # a file, not a folder
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_paper_presets_micro_batch_is_named_as_such(script):
    from test_resume import module

    per_prompt = {"ppo.py": "samples_per_prompt", "gfpo.py": "k"}.get(script, "group_size")
    args = module(script).resolve_args(
        module(script).Args(preset="paper", num_prompts=2, num_minibatches=1, **{per_prompt: 3}))
    # 2 prompts x 3 completions in one minibatch of 6, which the preset's 8 rows a micro-batch do not divide
    with pytest.raises(common.UserError, match=r"^--micro-batch-size 8 \(yours, or the paper preset's\): must divide"
                                               r" the minibatch of 6 completions$"):
        module(script).validate_args(args)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_an_attention_whose_package_is_missing_is_a_user_error(tmp_path):
    check_bad_input("grpo.py", ["--attn-implementation", "flash_attention_2"],
                    "--attn-implementation flash_attention_2: not available here", tmp_path)


def check_bad_input(script, args, names, tmp_path):
    """In-process (fast): parsing the flags and starting `main` raises a UserError naming the flag."""
    import importlib

    import tyro

    bad_rows = write(tmp_path / "bad.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    module = importlib.import_module(script.removesuffix(".py"))
    parsed = tyro.cli(module.Args, args=[a.replace("{bad_rows}", bad_rows) for a in args] + ["--num-steps", "1"])
    with pytest.raises(common.UserError, match=re.escape(names.replace("{bad_rows}", bad_rows))):
        module.main(parsed)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args,names", BAD_INPUT)
def test_bad_input_raises_a_user_error(script, args, names, tmp_path):
    check_bad_input(script, args, names, tmp_path)


@pytest.mark.parametrize("args,names", [(["--group-size", "1"], "--group-size"), (["--clip-eps", "-0.1"], "--clip-eps")])
def test_bad_grpo_input(args, names, tmp_path):
    check_bad_input("grpo.py", args, names, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(common.UserError, match="--device cuda: torch sees no CUDA device here"):
        common.get_device("cuda")


@pytest.mark.parametrize("name,world_size,message", [
    ("cuda:2", "1", "--device cuda:2: torch sees 2 CUDA device(s) here"),  # GPUs 0 and 1
    ("cuda:0", "2", "--device cuda:0: under torchrun pass --device cuda"),  # else every process would take GPU 0
])
def test_a_cuda_device_that_is_not_there_or_is_shared_by_processes_is_a_user_error(name, world_size, message,
                                                                                  monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with 2 GPUs, as far as torch says
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(common.UserError, match=re.escape(message)):
        common.get_device(name)


def test_a_folder_that_holds_no_loadable_model_is_a_user_error_with_the_cause(tmp_path):
    # the folder exists, so the message must not say it was not found, and it must carry transformers' reason
    shutil.copytree(common.TINY_MODEL, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps(dict(config, model_type="no-such-architecture")))
    with pytest.raises(common.UserError, match=rf"^--model {re.escape(str(tmp_path / 'model'))}: cannot load a model "
                                               r"from it \(.*no-such-architecture"):
        common.load_model(str(tmp_path / "model"), torch.device("cpu"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_user_error_is_one_line_and_exit_2(script, tmp_path):
    result = run(script, "--learning-rate", "0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --learning-rate"), result.stderr[-2000:]


def test_grpo_learns_arithmetic_with_a_fixed_seed(tmp_path):
    # 15 of the embedded default's 100 steps (seed 1): held-out greedy accuracy must rise by 15 points or more
    # (seeds 1-4 rose by 50 or more points in 15 steps: the margin is wide)
    result = run("grpo.py", "--num-steps", "15", "--eval-every", "0", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    start, end = map(float, re.search(r"start (\S+) -> end (\S+)", result.stdout).groups())
    assert end >= start + 0.15, result.stdout[-3000:]
