"""Several processes: torchrun with FSDP2 on the CPU (gloo), 2 processes."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
from test_resume import assert_same_weights, module
from test_scripts import ENV, ROOT, SCRIPTS, SMALL


def torchrun(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)],
        capture_output=True, text=True, env=dict(ENV, OMP_NUM_THREADS="1"), timeout=timeout,
    )


def test_sharded_gradients_equal_one_process(tmp_path):
    result = torchrun(ROOT / "tests" / "distributed_check.py", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split(" (")[0] for line in result.stdout.splitlines() if line.startswith("ok")] == [
        "ok sharding", "ok resume", "ok grpo", "ok dapo", "ok gspo", "ok gfpo", "ok ppo"
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_train_and_save_a_checkpoint_that_loads_back(script, tmp_path):
    result = torchrun(ROOT / script, "--num-steps", "2", "--eval-every", "0", "--save-dir", tmp_path, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("held-out greedy accuracy: start") == 1  # rank 0 prints, rank 1 is silent
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "step_2")
    initial = load_file(common.TINY_MODEL / "model.safetensors")
    full = dict(saved.named_parameters())
    assert all(full[name].shape == tensor.shape for name, tensor in initial.items())  # whole, not one shard
    assert any(not torch.equal(full[name], tensor) for name, tensor in initial.items())
    # the LM head is tied to the embedding: written once, as a single process and the shipped model write it
    assert load_file(tmp_path / "step_2" / "model.safetensors").keys() == initial.keys()
    logged = (tmp_path / common.METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [0, 1, 2]  # rank 0 alone writes (0: the start eval)


def test_two_processes_resume_equals_an_unbroken_run(tmp_path):
    flags = ["--eval-every", "0", "--save-every", "2", *SMALL]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    assert torchrun(ROOT / "ppo.py", "--num-steps", "4", "--save-dir", unbroken, *flags).returncode == 0
    assert torchrun(ROOT / "ppo.py", "--num-steps", "2", "--save-dir", broken, *flags).returncode == 0
    result = torchrun(ROOT / "ppo.py", "--num-steps", "4", "--resume", broken, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {d: [json.loads(line) for line in (d / common.METRICS_FILE).read_text().splitlines()]
            for d in (unbroken, broken)}
    assert [r.get("reward/mean") for r in rows[broken]] == [r.get("reward/mean") for r in rows[unbroken]]
    assert [r.get("loss/policy", 0) for r in rows[broken]] == pytest.approx([r.get("loss/policy", 0) for r in rows[unbroken]])
    assert_same_weights(broken / "step_4", unbroken / "step_4")  # the policy and the critic


@pytest.mark.parametrize("script", SCRIPTS)
def test_num_prompts_must_divide_by_the_processes(script):
    args = module(script).resolve_args(module(script).Args(num_prompts=6))
    module(script).validate_args(args, world_size=2)  # 3 prompts each
    args = module(script).resolve_args(module(script).Args(num_prompts=5))
    with pytest.raises(common.UserError, match=r"--num-prompts 5: must be divisible by the number of processes \(2\)"):
        module(script).validate_args(args, world_size=2)


def test_adaptive_k_is_one_process_only():
    args = module("gfpo.py").resolve_args(module("gfpo.py").Args(adaptive_k=True))
    module("gfpo.py").validate_args(args)
    with pytest.raises(common.UserError, match="--adaptive-k: one process only"):
        module("gfpo.py").validate_args(args, world_size=2)


def test_resume_with_another_number_of_processes_is_a_user_error(tmp_path):
    result = torchrun(ROOT / "grpo.py", "--num-steps", "1", "--eval-every", "0", "--save-dir", tmp_path, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(common.UserError, match="saved by 2 process"):
        module("grpo.py").main(module("grpo.py").Args(num_steps=2, eval_every=0, resume=str(tmp_path)))


def test_finish_distributed_waits_at_a_barrier_before_destroying_the_group(monkeypatch):
    # gloo's workers free the last collective's tensors under the GIL: exiting right after it can abort the process
    calls = []
    monkeypatch.setattr(common.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(common.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(common.dist, "destroy_process_group", lambda: calls.append("destroy"))
    common.finish_distributed()
    assert calls == ["barrier", "destroy"]
