"""Trains a DEQ classifier with PyTorch's DistributedDataParallel around the Keras model
(two CPU worker processes started by this script, the gloo backend, a custom training loop as in Keras' guide to
distributed training with PyTorch), and, in the same run, on one process with the whole
batch; prints both final weights as JSON. Run by tests/torch/test_ddp.py."""

import datetime
import faulthandler
import json
import os
import subprocess
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import keras_deq  # noqa: E402

STEPS, BATCH = 3, 16


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 8)).astype("float32")
    y = rng.integers(0, 3, size=(STEPS * BATCH,))
    return torch.tensor(x), torch.tensor(y)


def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16),
            keras_deq.DEQ(keras_deq.DenseCell(16), max_iter=40, name="deq"),
            keras.layers.Dense(3),
        ]
    )


def train(net, module, shard=slice(None)):
    """`STEPS` SGD steps; each process takes its `shard` of every batch."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = data()
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        xb, yb = x[rows][shard], y[rows][shard]
        optimizer.zero_grad()
        loss_fn(net(xb), yb).backward()
        optimizer.step()
    return [w.detach().cpu().numpy().tolist() for w in module.parameters()]


def worker(rank, world, init_file, out_file):
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints where, then exits
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # an error, not a hang
    )
    torch.set_num_threads(1)
    keras_model = model()
    ddp = torch.nn.parallel.DistributedDataParallel(keras_model)
    half = BATCH // world
    weights = train(ddp, keras_model, slice(rank * half, (rank + 1) * half))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(weights, f)
    # The DDP wrapper goes before the process group: its destructor after
    # `destroy_process_group` hung at exit in about one run of three.
    del ddp
    dist.destroy_process_group()


def main():
    if len(sys.argv) == 5:  # a worker: rank, world size, init file, output file
        rank, world, init_file, out_file = sys.argv[1:]
        return worker(int(rank), int(world), init_file, out_file)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "ddp.json")
        init_file = os.path.join(tmp, "init")
        workers = [
            subprocess.Popen([sys.executable, __file__, str(rank), "2", init_file, out_file])
            for rank in range(2)
        ]
        try:
            codes = [w.wait(timeout=300) for w in workers]
        finally:
            for w in workers:
                w.kill()
        if any(codes):
            return 1
        with open(out_file) as f:
            ddp_weights = json.load(f)
    single = model()
    initial = [w.detach().cpu().numpy().tolist() for w in single.parameters()]
    result = {"ddp": ddp_weights, "single": train(single, single), "initial": initial}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
