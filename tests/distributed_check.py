"""Run by test_distributed.py as `torchrun --nproc_per_node 2 tests/distributed_check.py FOLDER` (not a pytest file).

First, FSDP2 as the scripts use it: a loaded model is never whole on a process after sharding (nor after
generating or training), one `generate` call all-gathers each sharded module's parameters once, not once per
token, and a resume reads the checkpoint's optimizer states on the first process alone. Then, for one fixed global
batch, every script's accumulate_gradients, with the batch split over the processes and the model sharded by
FSDP2 (gloo, CPU), must give the gradient that one process gets on the whole batch. The
batch has completions of unequal lengths, so a token-mean normalised per process instead of globally
(DAPO's, GFPO's, PPO's) would give a different gradient; off-policy old log-probs make the clipping live.
"""

import copy
import gc
import math
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import dapo  # noqa: E402
import gfpo  # noqa: E402
import grpo  # noqa: E402
import gspo  # noqa: E402
import ppo  # noqa: E402
import tasks  # noqa: E402

CPU = torch.device("cpu")


def gradients(*models):
    return torch.cat([common._local(p.grad).flatten() for m in models for p in m.parameters()])


def assert_never_whole(model):
    """Each parameter is a DTensor of which this process holds half, and no live tensor has a weight's full shape."""
    from torch.distributed.tensor import DTensor

    shapes, shards = set(), set()  # the weights' full shapes; the storages of this process's shards and gradients
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor) and p.to_local().numel() <= math.ceil(p.numel() / 2), name
        shards.update(t.to_local().untyped_storage().data_ptr() for t in (p, p.grad) if t is not None)
        if p.dim() == 2:
            shapes.add(tuple(p.shape))
    with warnings.catch_warnings():  # scanning every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        whole = [tuple(o.shape) for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, DTensor)
                 and tuple(o.shape) in shapes and o.untyped_storage().nbytes() > 0  # resharded: storage freed
                 and o.untyped_storage().data_ptr() not in shards]
    assert not whole, whole


def check_sharding(tokenizer):
    calls, all_gather_single = [], torch.distributed.all_gather_single

    def counted(*args, **kwargs):
        calls.append(1)
        return all_gather_single(*args, **kwargs)

    model = common.load_model("tiny", CPU, torch.bfloat16)
    assert_never_whole(model)
    sharded = [m for m in model.modules() if common.is_sharded(m)]  # 2 decoder layers and the root
    eos = common.eos_token_ids(model, tokenizer)
    torch.distributed.all_gather_single = counted
    try:
        rollout = common.generate(model, tokenizer, ["1+2=", "13+45="], 4, 8, 10.0, eos)  # hot: EOS is rare
    finally:
        torch.distributed.all_gather_single = all_gather_single
    assert rollout.completion_ids.shape[1] >= 4  # several decoding steps ran
    assert 0 < len(calls) <= len(sharded) == 3, (len(calls), len(sharded))
    assert_never_whole(model)
    logp, _ = common.completion_logprobs(model, rollout, 1.0)
    (logp * rollout.completion_mask).sum().backward()
    assert_never_whole(model)
    common.rollout_logprobs(model, rollout, 1.0, 4)  # no backward follows, as for the reference model
    assert_never_whole(model)
    print(f"ok sharding ({len(calls)} all-gathers for {rollout.completion_ids.shape[1]} tokens)")


def check_resume(folder, tokenizer):
    """Resuming under FSDP2, the second process never reads the optimizer states (twice the weights' size): the
    first sends it its shards, and both end with every weight and AdamW state that was saved."""
    from torch.distributed.checkpoint import state_dict as dcp

    def trained_model():
        model = common.load_model("tiny", CPU)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def values(model, optimizer):  # step, exp_avg and exp_avg_sq of every parameter included
        return [common._local(t).clone() for t in list(model.parameters()) + [
            v for state in optimizer.state.values() for v in state.values()]]

    model, optimizer = trained_model()
    for _ in range(2):  # AdamW's step count 2, its moments nonzero
        model(input_ids=torch.tensor([[17, 18, 19]])).logits.square().mean().backward()
        optimizer.step()
    prompts = tasks.PromptStream([{"prompt": "1+2=", "answer": 3}], seed=0)
    common.save_training_state(folder, 2, "check", tokenizer, {"policy": model}, {"policy": optimizer}, prompts,
                               extra={"start_eval": (0.5, 4.0)})
    fresh, fresh_optimizer = trained_model()
    sent, set_optimizer_state_dict = [], dcp.set_optimizer_state_dict

    def recorded(model, optimizer, state, options):
        sent.append(len(state))  # "state" and "param_groups", or nothing
        return set_optimizer_state_dict(model, optimizer, state, options=options)

    dcp.set_optimizer_state_dict = recorded
    try:
        common.load_training_state(str(folder / "step_2"), "check", {"policy": fresh}, {"policy": fresh_optimizer},
                                   prompts)
    finally:
        dcp.set_optimizer_state_dict = set_optimizer_state_dict
    assert sent == ([2] if common.rank() == 0 else [0]), sent
    assert not [line for line in open("/proc/self/maps") if common.TRAINING_STATE in line]  # let go of the file
    want = values(model, optimizer)
    assert len(want) == 4 * len(list(model.parameters()))  # a weight, a step and two moments each
    for got, want in zip(values(fresh, fresh_optimizer), want, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    print("ok resume")


def main():
    rank = common.init_distributed(CPU)
    world = common.world_size()
    assert world == 2, "run under torchrun --nproc_per_node 2"
    torch.manual_seed(0)  # the same batch and tensors on both processes
    tokenizer = common.load_tokenizer("tiny")
    check_sharding(tokenizer)
    check_resume(Path(sys.argv[1]), tokenizer)
    # whole models (common.load_model would shard them under torchrun), each process with the same weights
    initial = common.prepare(AutoModelForCausalLM.from_pretrained(common.TINY_MODEL), gradient_checkpointing=False)
    initial_critic = common.prepare(AutoModelForTokenClassification.from_pretrained(common.TINY_MODEL, num_labels=1),
                                    gradient_checkpointing=False)
    with torch.no_grad():  # a live value head (the real one starts at zero)
        initial_critic.score.weight.normal_(0, 0.1)
    eos = common.eos_token_ids(initial, tokenizer)
    rollout = common.generate(initial, tokenizer, ["1234+5=", "5678-3=", "4321+1=", "2000-2="], 4, 8, 1.0, eos)
    B, T = rollout.completion_ids.shape  # 16 rows, 8 per process
    assert rollout.lengths.unique().numel() > 1
    logp = common.rollout_logprobs(initial, rollout, 1.0, micro_batch_size=B)
    old_logp = logp + 0.3 * torch.randn_like(logp)
    ref_logp = logp - 0.2
    seq_advantages, token_advantages, returns = torch.randn(B), torch.randn(B, T), torch.randn(B, T)
    old_values = 0.3 * torch.randn(B, T)
    share = slice(rank * B // world, (rank + 1) * B // world)

    def check(name, run, with_critic=False, global_metrics=False):
        """run(model, critic, rollout, rows, micro_batch_size) accumulates one script's gradients and returns its
        metrics. With `global_metrics` (the token-mean scripts) their mean over the processes must also be the whole
        batch's: each process weighs its token means by the token count averaged over the processes."""
        model, critic = copy.deepcopy(initial), copy.deepcopy(initial_critic)
        want_metrics = run(model, critic, rollout, slice(None), B)
        want = gradients(model, critic) if with_critic else gradients(model)
        for micro_batch_size in (B // world, 2):
            model = common.place(copy.deepcopy(initial), CPU, torch.float32)
            critic = common.place(copy.deepcopy(initial_critic), CPU, torch.float32)
            metrics = run(model, critic, rollout.select(torch.arange(B)[share]), share, micro_batch_size)
            got = gradients(model, critic) if with_critic else gradients(model)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{name}, micro-batch {micro_batch_size}")
            if global_metrics:
                got_metrics = common.mean_over_processes(metrics)
                for key, value in want_metrics.items():
                    torch.testing.assert_close(got_metrics[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}, {key}")
        print(f"ok {name}")

    def minibatch(rows):
        return torch.arange(B)[rows].sub(rows.start or 0)

    check("grpo", lambda m, c, r, rows, micro: grpo.accumulate_gradients(
        m, r, old_logp[rows], ref_logp[rows], seq_advantages[rows], minibatch(rows), micro,
        grpo.resolve_args(grpo.Args(beta=0.04)),
    ))
    check("dapo", lambda m, c, r, rows, micro: dapo.accumulate_gradients(
        m, r, old_logp[rows], seq_advantages[rows], minibatch(rows), micro, dapo.resolve_args(dapo.Args()),
    ), global_metrics=True)
    check("gspo", lambda m, c, r, rows, micro: gspo.accumulate_gradients(
        m, r, old_logp[rows], seq_advantages[rows], minibatch(rows), micro, gspo.resolve_args(gspo.Args()),
    ))
    check("gfpo", lambda m, c, r, rows, micro: gfpo.accumulate_gradients(
        m, r, old_logp[rows], ref_logp[rows], seq_advantages[rows], minibatch(rows), micro,
        gfpo.resolve_args(gfpo.Args(beta=0.04)),
    ), global_metrics=True)
    check("ppo", lambda m, c, r, rows, micro: ppo.accumulate_gradients(
        m, c, r, old_logp[rows], old_values[rows], token_advantages[rows], returns[rows], minibatch(rows), micro,
        ppo.resolve_args(ppo.Args(ent_coef=0.01)),
    ), with_critic=True, global_metrics=True)
    common.finish_distributed()


if __name__ == "__main__":
    main()
