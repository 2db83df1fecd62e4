"""What DDP's per-step buffer broadcast costs the autoregressive families, whose masks are buffers.

`DistributedDataParallel` broadcasts every buffer from rank 0 at the start of each forward unless
`broadcast_buffers=False`. The masks of MADE, NADE, FVSBN and PixelCNN never change, yet MADE's
output mask over 256 levels per sub-pixel is hundreds of MB at 3x32x32. This times training steps of
each family's default form in 8-bit at a given image shape, two CPU processes over gloo, with and
without the broadcast.

    .venv/bin/python bench/ddp_buffers.py --shape 3 32 32 --steps 5
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import machine, publish, results_arguments

from components.models import create_model

FAMILIES = ("made", "nade", "fvsbn", "pixelcnn")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, family: str, shape: tuple[int, ...], args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = create_model(family, shape, pixels="8bit")
    network = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=args.broadcast)
    optimizer = model.configure_optimizers(1e-3)["model"]
    x = torch.randint(0, 256, (args.batch, *shape), generator=torch.Generator().manual_seed(rank)) / 255
    times = []
    for _ in range(args.steps + 1):  # the first step warms up
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        network(x, "model")["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        out.put((sum(times[1:]) / args.steps, buffers, sum(p.numel() for p in model.parameters())))
    dist.destroy_process_group()


def measure(family: str, shape: tuple[int, ...], args, broadcast: bool) -> tuple[float, int, int]:
    args.broadcast = broadcast
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(_free_port(), family, shape, args, queue), nprocs=WORLD, join=True)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--batch", type=int, default=16, help="images per worker and step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--families", default=",".join(FAMILIES))
    results_arguments(parser, Path(__file__).with_name("RESULTS-ddp-buffers.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each worker: the machine line says so
    shape = tuple(args.shape)
    rows = []
    for family in args.families.split(","):
        with_broadcast, buffers, weights = measure(family, shape, args, True)
        without, _, _ = measure(family, shape, args, False)
        rows.append(
            f"| {family} | {weights:,} | {buffers / 1e6:,.1f} | {with_broadcast:.3f} | {without:.3f} "
            f"| {with_broadcast / without:.2f} |"
        )
        print(rows[-1], flush=True)
    side = "x".join(map(str, shape))
    report = f"""# DDP's per-step buffer broadcast and the autoregressive families' masks

Each family's default form in 8-bit at {side}, two CPU processes over gloo (one thread each), batch
{args.batch} per process, Adam; mean seconds per training step (forward, backward with the gradient
all-reduce, optimiser step) over {args.steps} steps after one warm-up, with DDP's
`broadcast_buffers` on (PyTorch's default) and off. Buffers: the model's buffers (the masks) in MB,
what the broadcast sends from rank 0 at every forward.

Machine: {machine()}.
Command: `.venv/bin/python bench/ddp_buffers.py --shape {" ".join(map(str, shape))} --batch {args.batch} --steps {args.steps} --families {args.families}`

| family | weights | buffers MB | s/step, broadcast | s/step, none | ratio |
|---|---:|---:|---:|---:|---:|
""" + "\n".join(rows)
    publish(args, report)


if __name__ == "__main__":
    main()
