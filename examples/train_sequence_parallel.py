"""Train a small HyperConformer-style encoder with sequence parallelism on synthetic data.

Every rank holds one contiguous slice of every sequence (the ranks' slices, in rank order, make up
the whole sequence; uneven slices are fine). Each HyperMixing layer all-reduces its
[B, H, k_h, d_h] state over the group in the forward and its gradient in the backward; everything
else in the encoder (norms, feed-forward blocks, the loss) is per token and needs no communication.
The parameter gradients are summed over the ranks after the backward, so every rank takes the same
optimizer step as one process on the whole sequences would.

    torchrun --nproc_per_node=2 examples/train_sequence_parallel.py          # 2 processes, gloo (CPU)
    python examples/train_sequence_parallel.py                               # 1 process, same losses

Several machines: the same command on every machine, with its own --node_rank (0 .. nnodes-1) and
node 0's address as the endpoint (GLOO_SOCKET_IFNAME=<interface> picks the network interface):

    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=0 --rdzv_endpoint=node0.example:29500 \
        examples/train_sequence_parallel.py --length 65536

Prints the loss of each step (rank 0); `--losses-json PATH` also writes them (used by the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import hmx_kernels
from hmx_kernels import FusedHyperMixing


class EncoderLayer(nn.Module):
    """Pre-norm HyperConformer-style block: HyperMixing and a feed-forward block, each residual."""

    def __init__(self, d, k, heads, group, backend):
        super().__init__()
        self.norm_mix = nn.LayerNorm(d)
        self.mix = FusedHyperMixing(d, k, num_heads=heads, sequence_parallel_group=group, backend=backend)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, position_offset):
        h = self.norm_mix(x)
        x = x + self.mix(h, position_offset=position_offset)[0]
        return x + self.ff(self.norm_ff(x))


class Encoder(nn.Module):
    def __init__(self, features, d, k, heads, layers, outputs, group=None, backend="auto"):
        super().__init__()
        self.inp = nn.Linear(features, d)
        self.layers = nn.ModuleList(EncoderLayer(d, k, heads, group, backend) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, outputs)

    def forward(self, x, position_offset=0):
        """x: this rank's slice [B, n, features] of every sequence; position_offset: the global
        position of its first token (the same for every layer, so it is computed once)."""
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, position_offset)
        return self.out(self.norm(h))


def synthetic_batch(step, batch, length, features, outputs, seed):
    """The same full batch on every rank: inputs and per-token targets that depend on the whole
    sequence (a token's target mixes its own features with the sequence's mean)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch, length, features, generator=g)
    local_map = torch.randn(features, outputs, generator=torch.Generator().manual_seed(seed))
    global_map = torch.randn(features, outputs, generator=torch.Generator().manual_seed(seed + 1))
    target = torch.tanh(x @ local_map / features ** 0.5 + x.mean(1, keepdim=True) @ global_map)
    return x, target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=1024, help="tokens per sequence (all ranks together)")
    p.add_argument("--features", type=int, default=40, help="input features per token (e.g. filterbanks)")
    p.add_argument("--width", type=int, default=144, help="model width d")
    p.add_argument("--hypernet-size", type=int, default=576, help="HyperMixing hypernetwork size k over all heads")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--outputs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="HyperMixing backend (auto picks one that takes the group)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--losses-json", default=None, help="rank 0 writes the per-step losses here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        rank, world = dist.get_rank(), dist.get_world_size()
        group = dist.group.WORLD
    else:
        rank, world, group = 0, 1, None

    # this rank's contiguous slice of every sequence (uneven when world does not divide the length)
    bounds = torch.linspace(0, args.length, world + 1).round().long().tolist()
    lo, hi = bounds[rank], bounds[rank + 1]
    offset = hmx_kernels.sequence_parallel_offset(hi - lo, group) if distributed else 0
    assert offset == lo, (offset, lo)

    torch.manual_seed(args.seed)  # same initial parameters on every rank
    model = Encoder(args.features, args.width, args.hypernet_size, args.heads, args.layers, args.outputs, group, args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    mix = model.layers[0].mix
    probe = torch.zeros(args.batch, hi - lo, args.width)
    ran = hmx_kernels.select_backend(args.backend, hmx_kernels.check_inputs(
        probe, None, None, *mix.hyper.w1_gen.tensors(), *mix.hyper.w2_gen.tensors(),
        mix.layer_norm.weight, mix.layer_norm.bias, position_offset=offset, sequence_parallel_group=group)).name
    state_values = args.batch * args.hypernet_size * (args.width // args.heads)  # B * H * k_h * d_h per all-reduce
    if rank == 0:
        print(f"{world} process(es), tokens {lo}..{hi} of {args.length} on rank 0, HyperMixing backend "
              f"{ran!r}; per layer and step {'2 all-reduces of ' + str(state_values * 4) + ' bytes' if distributed else 'no communication'}",
              flush=True)

    losses = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, target = synthetic_batch(step, args.batch, args.length, args.features, args.outputs, args.seed)
        x, target = x[:, lo:hi], target[:, lo:hi]
        pred = model(x, position_offset=offset)
        # mean over all tokens of all ranks: local sum / global count
        loss = (pred - target).pow(2).sum() / (args.batch * args.length * args.outputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        total = loss.detach().clone()
        if distributed:
            # each rank's loss covers its tokens only: the gradient of the global loss is the sum
            grads = [q.grad for q in model.parameters() if q.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            i = 0
            for g in grads:
                g.copy_(flat[i:i + g.numel()].view_as(g))
                i += g.numel()
            dist.all_reduce(total)
        opt.step()
        losses.append(float(total))
        if rank == 0:
            print(f"step {step + 1:4d}  loss {losses[-1]:.6f}  {1e3 * (time.perf_counter() - t0):7.1f} ms", flush=True)

    if rank == 0 and args.losses_json:
        with open(args.losses_json, "w") as f:
            json.dump({"world": world, "backend": ran, "losses": losses}, f)
    if distributed:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
