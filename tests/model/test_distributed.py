"""Two gloo processes on the CPU give the single-process loss and gradients of the same global batch."""

import pytest
import torch
import torch.multiprocessing as mp
from helpers.ports import free_port

from model.checkpoint import load_model
from model.distributed import DistContext, init_process_group, shard, shutdown, wrap_model

CAPTIONS = [
    f"a {c} {s} moves {d}"
    for c, s, d in zip(
        "red blue green pink grey cyan white black".split(),
        ["square", "circle", "star", "cross"] * 2,
        ["left", "right", "up", "down"] * 2,
        strict=True,
    )
]
WORLD = 2


def _batch(model):
    torch.manual_seed(123)
    frames = model.preprocess_frames(torch.randint(0, 256, (len(CAPTIONS), 4, 32, 32, 3), dtype=torch.uint8))
    return model.tokenize(CAPTIONS), frames


def _randomise(model):
    # A zero-initialised focus head would leave most focused-view gradients at zero and prove little.
    torch.manual_seed(7)
    with torch.no_grad():
        for head in (model.focus_t2v.head[-1], model.focus_v2t.head[-1]):
            head.weight.normal_(std=0.5)


def _step(model, ids, frames):
    model.train()
    torch.manual_seed(99)  # the same Gumbel noise in every process and in the reference
    losses = model(ids, frames)
    losses["loss"].backward()
    module = model.module if hasattr(model, "module") else model
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _worker(rank, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_process_group("gloo", rank, WORLD)
    ctx = DistContext(rank=rank, world_size=WORLD)
    try:
        model = load_model("tiny")
        _randomise(model)
        ids, frames = _batch(model)
        ddp = wrap_model(model, ctx)
        rows = list(range(len(CAPTIONS)))
        mine = shard(rows, ctx)
        losses, grads = _step(ddp, ids[mine], frames[mine])
        torch.save({"losses": losses, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        shutdown(ctx)


@pytest.fixture(scope="module")
def reference():
    model = load_model("tiny")
    _randomise(model)
    return _step(model, *_batch(model))


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_every_process_sees_the_global_batch_loss(reference, distributed):
    ref_losses, _ = reference
    for result in distributed:
        for name, value in ref_losses.items():
            assert torch.allclose(result["losses"][name], value, atol=1e-5), name


def test_ddp_gradients_equal_single_process_gradients(reference, distributed):
    _, ref_grads = reference
    for result in distributed:
        grads = result["grads"]
        assert set(grads) == set(ref_grads)
        for name, g in ref_grads.items():
            assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), name
    # The backbone and the focused view both receive gradient, so the comparison above covers them.
    assert ref_grads["clip.visual.conv1.weight"].abs().sum() > 0
    assert ref_grads["focus_t2v.blocks.0.q_proj.weight"].abs().sum() > 0


def test_uneven_global_batch_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        shard(list(range(5)), DistContext(rank=0, world_size=2))
