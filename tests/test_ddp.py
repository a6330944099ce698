"""Two CPU processes under DDP (gloo on localhost) train identical replicas with the expected loss."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import make_train_checkpoint

from adapprox_cli.train.loop import TrainConfig, train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

STEPS = 4
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, checkpoint: str, out: str) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    config = TrainConfig(
        checkpoint=Path(checkpoint),
        steps=STEPS,
        device="cpu",
        eval_iters=2,
        out_dir=Path(out) / "ckpt",
        handle_signals=False,
    )
    result = train(config)
    torch.save(
        {
            "params": result.model.state_dict(),
            "losses": [h["loss"] for h in result.history],
            "val": result.final_val_loss,
        },
        Path(out) / f"rank{rank}.pt",
    )


def test_two_processes_stay_identical_and_match_single_process(tmp_path):
    # dropout 0: the replicas' only differences would come from their batches, which DDP averages.
    checkpoint = make_train_checkpoint(tmp_path / "source", dropout=0.0)
    # Forked workers inherit the imported modules: no second start-up of torch in each (10 s here).
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # the optimizer machinery, imported once
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(checkpoint), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method=START_METHOD,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
    # Every rank logs the mean loss over ranks; only rank 0 wrote a checkpoint, with both samplers.
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == STEPS
    saved = torch.load(tmp_path / "ckpt" / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 3 + STEPS and len(saved["sampler"]["generator_states"]) == 2
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, saved["model"][key]), key

    # The single-process run with the same total batch (2 x 4 sequences) lands at the same loss.
    single = train(
        TrainConfig(checkpoint=checkpoint, steps=STEPS, batch_size=8, eval_iters=2, handle_signals=False)
    )
    assert abs(single.final_val_loss - ranks[0]["val"]) < 0.05 * single.final_val_loss
    assert abs(single.history[-1]["loss"] - ranks[1]["losses"][-1]) < 0.1 * single.history[-1]["loss"]
