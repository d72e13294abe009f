"""Run by test_distributed.py as `torchrun --nproc_per_node 2 tests/distributed_check.py` (not a pytest file).

For one fixed global batch, every script's accumulate_gradients, with the batch split over the processes and
the model sharded by FSDP2 (gloo, CPU), must give the gradient that one process gets on the whole batch. The
batch has completions of unequal lengths, so a token-mean normalised per process instead of globally
(DAPO's, GFPO's, PPO's) would give a different gradient; off-policy old log-probs make the clipping live.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import dapo  # noqa: E402
import gfpo  # noqa: E402
import grpo  # noqa: E402
import gspo  # noqa: E402
import ppo  # noqa: E402

CPU = torch.device("cpu")


def rows_of(rollout: common.Rollout, rows: slice) -> common.Rollout:
    fields = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in vars(rollout).items()}
    return common.Rollout(**fields)


def gradients(*models):
    return torch.cat([common._local(p.grad).flatten() for m in models for p in m.parameters()])


def main():
    rank = common.init_distributed(CPU)
    world = common.world_size()
    assert world == 2, "run under torchrun --nproc_per_node 2"
    torch.manual_seed(0)  # the same batch and tensors on both processes
    tokenizer = common.load_tokenizer("tiny")
    initial = common.load_model("tiny", CPU)
    initial_critic = common.load_critic("tiny", CPU)
    with torch.no_grad():  # a live value head (the real one starts at zero)
        initial_critic.score.weight.normal_(0, 0.1)
    eos = common.eos_token_ids(initial, tokenizer)
    rollout = common.generate(initial, tokenizer, ["1+2=", "13+45=", "7+8=", "2+2="], 4, 5, 1.0, eos)
    B, T = rollout.completion_ids.shape  # 16 rows, 8 per process
    assert rollout.lengths.unique().numel() > 1
    with torch.no_grad():
        logp, _ = common.completion_logprobs(
            initial, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, 1.0
        )
    old_logp = logp + 0.3 * torch.randn_like(logp)
    ref_logp = logp - 0.2
    seq_advantages, token_advantages, returns = torch.randn(B), torch.randn(B, T), torch.randn(B, T)
    old_values = 0.3 * torch.randn(B, T)
    share = slice(rank * B // world, (rank + 1) * B // world)

    def check(name, run, with_critic=False):
        """run(model, critic, rollout, rows, micro_batch_size) accumulates one script's gradients."""
        model, critic = copy.deepcopy(initial), copy.deepcopy(initial_critic)
        run(model, critic, rollout, slice(None), B)
        want = gradients(model, critic) if with_critic else gradients(model)
        for micro_batch_size in (B // world, 2):
            model = common.shard_model(copy.deepcopy(initial))
            critic = common.shard_model(copy.deepcopy(initial_critic))
            run(model, critic, rows_of(rollout, share), share, micro_batch_size)
            got = gradients(model, critic) if with_critic else gradients(model)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{name}, micro-batch {micro_batch_size}")
        print(f"ok {name}")

    def minibatch(rows):
        return torch.arange(B)[rows].sub(rows.start or 0)

    check("grpo", lambda m, c, r, rows, micro: grpo.accumulate_gradients(
        m, r, old_logp[rows], ref_logp[rows], seq_advantages[rows], minibatch(rows), micro,
        grpo.resolve_args(grpo.Args(beta=0.04)),
    ))
    check("dapo", lambda m, c, r, rows, micro: dapo.accumulate_gradients(
        m, r, old_logp[rows], seq_advantages[rows], minibatch(rows), micro, dapo.resolve_args(dapo.Args()),
    ))
    check("gspo", lambda m, c, r, rows, micro: gspo.accumulate_gradients(
        m, r, old_logp[rows], seq_advantages[rows], minibatch(rows), micro, gspo.resolve_args(gspo.Args()),
    ))
    check("gfpo", lambda m, c, r, rows, micro: gfpo.accumulate_gradients(
        m, r, old_logp[rows], ref_logp[rows], seq_advantages[rows], minibatch(rows), micro,
        gfpo.resolve_args(gfpo.Args(beta=0.04)),
    ))
    check("ppo", lambda m, c, r, rows, micro: ppo.accumulate_gradients(
        m, c, r, old_logp[rows], old_values[rows], token_advantages[rows], returns[rows], minibatch(rows), micro,
        ppo.resolve_args(ppo.Args(ent_coef=0.01)),
    ), with_critic=True)
    common.finish_distributed()


if __name__ == "__main__":
    main()
