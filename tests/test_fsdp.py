"""Adapprox on FSDP2 (DTensor, Shard(0)) parameters: two CPU processes (gloo) against one."""

from __future__ import annotations

import copy
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adapprox_cli.optim import Adapprox

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

WORLD = 2
BATCH = 8  # global batch; each rank takes BATCH / WORLD rows
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
# The sharded step keeps the per-step rank rule (the dense-EMA sketch is not sharded yet), so the
# one-process references use it too.
FIXED = dict(rank_init=2, rank_min=2, rank_max=2, rank_rule="step")  # sharded vs one process
ADAPTIVE = dict(rank_init=1, rank_min=1, rank_max=None, tol=0.01, rank_rule="step")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    # (33, 16): 33 rows split 17 / 16; (8, 33) even; a (1, 8) head whose bias shard on rank 1 is empty.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 8), nn.Tanh(), nn.Linear(8, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 16, generator=g)
    return x, torch.randn(BATCH, 1, generator=g)


def _train(model, optimizer, steps: range, rank: int | None = None) -> None:
    for step in steps:
        x, y = _batch(step)
        if rank is not None:
            rows = BATCH // WORLD
            x, y = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _init(rank: int, port: int):
    import os

    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    return init_device_mesh("cpu", (WORLD,))


def _sharded(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def _step_worker(rank: int, port: int, out: str, settings: dict, steps: int) -> None:
    mesh = _init(rank, port)
    model = _sharded(mesh)
    optimizer = Adapprox(model.parameters(), lr=1e-2, **settings)
    ranks = []
    for step in range(steps):
        _train(model, optimizer, range(step, step + 1), rank)
        ranks.append(optimizer.ranks())
    state = optimizer.state[model[0].weight]
    torch.save(
        {
            "params": _full(model),
            "ranks": ranks,
            "q_rows": state["exp_avg_sq_q"].to_local().shape[0],
            "q_type": type(state["exp_avg_sq_q"]).__name__,
            "u_full": tuple(state["exp_avg_sq_u"].to_local().shape),
            "u_local": [
                optimizer.state[p]["exp_avg_sq_u"].to_local() for p in (model[0].weight, model[2].weight)
            ],
            "exp_avg_rows": state["exp_avg"].to_local().shape[0],
            "bias_rows": optimizer.state[model[4].bias]["exp_avg_sq"].to_local().shape[0],
        },
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def _launch(worker, *args) -> None:
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imported once, before the fork
    mp.start_processes(worker, args=(_free_port(), *args), nprocs=WORLD, join=True, start_method=START_METHOD)


def _assert_close(actual: dict, expected: dict, rtol: float, start: dict | None = None) -> None:
    # Measured on what training changed (W - W_0), not on W: a stricter test than on the weights.
    start = _model().state_dict() if start is None else start
    for key, value in expected.items():
        change = value - start[key]
        assert change.norm() > 0, key  # every parameter moved: the check can fail
        err = (actual[key] - value).norm() / change.norm()
        assert err < rtol, (key, float(err))


def test_sharded_step_matches_one_process_at_a_fixed_rank(tmp_path):
    steps = 6
    _launch(_step_worker, str(tmp_path), FIXED, steps)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    reference = _model()
    optimizer = Adapprox(reference.parameters(), lr=1e-2, **FIXED)
    _train(reference, optimizer, range(steps))
    _assert_close(results[0]["params"], reference.state_dict(), 1e-3)
    # Q sharded by rows like the weight (17 + 16 = 33), U whole on every rank, moments sharded.
    assert [r["q_rows"] for r in results] == [17, 16] and results[0]["q_type"] == "DTensor"
    assert [r["u_full"] for r in results] == [(16, 2), (16, 2)]
    assert [r["exp_avg_rows"] for r in results] == [17, 16]
    assert [r["bias_rows"] for r in results] == [1, 0]  # an empty shard steps too


def test_adaptive_ranks_agree_across_ranks(tmp_path):
    _launch(_step_worker, str(tmp_path), ADAPTIVE, 5)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert results[0]["ranks"] == results[1]["ranks"]
    assert max(results[0]["ranks"][-1].values()) > 1  # the rank did adapt
    # U is computed on each rank from all-reduced sums: the copies agree bit for bit.
    for mine, theirs in zip(results[0]["u_local"], results[1]["u_local"]):
        assert torch.equal(mine, theirs)


def _dcp_worker(rank: int, port: int, out: str) -> None:
    from adapprox_cli.distributed import load_optimizer_dcp, save_optimizer_dcp

    mesh = _init(rank, port)
    model = _sharded(mesh)
    optimizer = Adapprox(model.parameters(), lr=1e-2, **ADAPTIVE)
    _train(model, optimizer, range(3), rank)
    save_optimizer_dcp(model, optimizer, Path(out) / "optim")
    snapshot = copy.deepcopy(model.state_dict())
    saved_model = _full(model)  # a collective: every rank gathers
    if rank == 0:
        torch.save(saved_model, Path(out) / "model.pt")
    _train(model, optimizer, range(3, 6), rank)
    uninterrupted = _full(model)
    # Back on two ranks: a fresh optimizer loads the saved ranks and continues identically.
    model.load_state_dict(snapshot)
    resumed = Adapprox(model.parameters(), lr=1e-2, **ADAPTIVE)
    load_optimizer_dcp(model, resumed, Path(out) / "optim")
    _train(model, resumed, range(3, 6), rank)
    torch.save({"uninterrupted": uninterrupted, "resumed": _full(model)}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_dcp_checkpoint_reshards_from_two_ranks_to_one_and_back(tmp_path):
    from adapprox_cli.distributed import load_optimizer_dcp

    _launch(_dcp_worker, str(tmp_path))
    result = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for key, value in result["uninterrupted"].items():
        assert torch.equal(value, result["resumed"][key]), key
    # One process, plain tensors: the saved ranks load and the run continues.
    model = _model()
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    optimizer = Adapprox(model.parameters(), lr=1e-2, **ADAPTIVE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        load_optimizer_dcp(model, optimizer, tmp_path / "optim")
    assert optimizer.state[model[0].weight]["step"].item() == 3
    assert max(optimizer.ranks().values()) > 1
    _train(model, optimizer, range(3, 6))
    _assert_close(model.state_dict(), result["uninterrupted"], 1e-4)


def test_inspect_reads_the_sharded_adapprox_checkpoint(tmp_path):
    from adapprox_cli.checkpoints.formats.dcp import load_dcp

    _launch(_dcp_worker, str(tmp_path))
    checkpoint = load_dcp(tmp_path / "optim")
    assert checkpoint.optimizer == "adapprox" and checkpoint.step == 3
    weight = next(p for p in checkpoint.params if p.name == "0.weight")
    # The two ranks' row blocks of Q reassembled: (33, k) with the rank the run had reached.
    q, u = weight.state["exp_avg_sq_q"], weight.state["exp_avg_sq_u"]
    assert q.shape[0] == 33 and u.shape == (16, q.shape[1]) and q.shape[1] > 1
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-5)  # orthonormal across ranks


def _placement_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from adapprox_cli.distributed import ShardingError

    mesh = _init(rank, port)
    messages = []
    for placement in (Replicate(), Shard(1)):
        weight = nn.Parameter(distribute_tensor(torch.randn(32, 32), mesh, [placement]))
        weight.grad = distribute_tensor(torch.ones(32, 32), mesh, [placement])
        optimizer = Adapprox([("blocks.0.weight", weight)], rank_rule="step")
        try:
            optimizer.step()
            messages.append("")
        except ShardingError as exc:
            messages.append(str(exc))
        assert not optimizer.state  # refused before any state was created
    torch.save(messages, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_other_placements_are_refused_naming_the_parameter(tmp_path):
    _launch(_placement_worker, str(tmp_path))
    messages = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert len(messages) == 2
    for message, placement in zip(messages, ("Replicate()", "Shard(dim=1)")):
        assert "'blocks.0.weight'" in message and placement in message and "Shard(0)" in message


def _adamw_worker(rank: int, port: int, out: str) -> None:
    from adapprox_cli.distributed import save_optimizer_dcp

    mesh = _init(rank, port)
    model = _sharded(mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, range(3), rank)
    save_optimizer_dcp(model, optimizer, Path(out) / "adamw")
    saved_model = _full(model)
    if rank == 0:
        torch.save(saved_model, Path(out) / "model.pt")
    dist.destroy_process_group()


def _resume_worker(rank: int, port: int, out: str) -> None:
    from adapprox_cli.distributed import load_optimizer_dcp

    mesh = _init(rank, port)
    model = _model()
    model.load_state_dict(torch.load(Path(out) / "model.pt", weights_only=True))
    model = _sharded_from(model, mesh)
    optimizer = Adapprox(model.parameters(), lr=1e-2, rank_rule="step")
    load_optimizer_dcp(model, optimizer, Path(out) / "adapprox")
    _train(model, optimizer, range(3, 6), rank)
    params = _full(model)
    if rank == 0:
        torch.save({"params": params, "ranks": optimizer.ranks()}, Path(out) / "resumed.pt")
    dist.destroy_process_group()


def _sharded_from(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def test_converted_adamw_fsdp2_checkpoint_resumes_sharded(tmp_path):
    from adapprox_cli.convert import convert_checkpoint
    from adapprox_cli.distributed import save_optimizer_dcp

    _launch(_adamw_worker, str(tmp_path))
    convert_checkpoint(tmp_path / "adamw", tmp_path / "converted.pt", output_format="plain", tol=0.05)
    converted = torch.load(tmp_path / "converted.pt", weights_only=True)

    def one_process():
        model = _model()
        model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
        optimizer = Adapprox(model.parameters(), lr=1e-2, rank_rule="step")
        optimizer.load_state_dict(converted)
        for group in optimizer.param_groups:  # the converted groups say "dense"; sharded runs "step"
            group["rank_rule"] = "step"
        return model, optimizer

    # The converted (plain, index-keyed) state becomes a DCP directory in one process ...
    model, optimizer = one_process()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        save_optimizer_dcp(model, optimizer, tmp_path / "adapprox")
    ranks = optimizer.ranks()
    assert max(ranks.values()) > 1  # the conversion chose ranks above rank_init: the load must resize
    # ... which two ranks load and continue, as one process continues from the converted state.
    _launch(_resume_worker, str(tmp_path))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    _train(model, optimizer, range(3, 6))
    assert resumed["ranks"] == optimizer.ranks()
    _assert_close(
        resumed["params"], model.state_dict(), 1e-3, torch.load(tmp_path / "model.pt", weights_only=True)
    )


def _full_state_worker(rank: int, port: int, out: str) -> None:
    from adapprox_cli.distributed import (
        full_model_state_dict,
        full_optimizer_state_dict,
        shard_optimizer_state,
    )

    mesh = _init(rank, port)
    model = _sharded(mesh)
    optimizer = Adapprox(model.parameters(), lr=1e-2, **ADAPTIVE)
    _train(model, optimizer, range(3), rank)
    full_state, full_model = full_optimizer_state_dict(optimizer), full_model_state_dict(model)
    snapshot = copy.deepcopy(model.state_dict())
    _train(model, optimizer, range(3, 5), rank)
    uninterrupted = full_model_state_dict(model)
    # A one-process state dict loaded onto sharded parameters, then sharded like them.
    model.load_state_dict(snapshot)
    resumed = Adapprox(model.parameters(), lr=1e-2, **ADAPTIVE)
    resumed.load_state_dict(copy.deepcopy(full_state))
    shard_optimizer_state(resumed)
    _train(model, resumed, range(3, 5), rank)
    torch.save(
        {
            "state": full_state,
            "model": full_model,
            "uninterrupted": uninterrupted,
            "resumed": full_model_state_dict(model),
        },
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_full_state_dict_gathers_and_shards_back(tmp_path):
    _launch(_full_state_worker, str(tmp_path))
    result = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for key, value in result["uninterrupted"].items():
        assert torch.equal(value, result["resumed"][key]), key
    # The gathered state is a one-process state dict: plain Adapprox continues from it.
    model = _model()
    model.load_state_dict(result["model"])
    optimizer = Adapprox(model.parameters(), lr=1e-2, **ADAPTIVE)
    optimizer.load_state_dict(result["state"])
    assert optimizer.state[model[0].weight]["exp_avg_sq_q"].shape[0] == 33
    _train(model, optimizer, range(3, 5))
    _assert_close(model.state_dict(), result["uninterrupted"], 1e-4, result["model"])


def _shard_worker(rank: int, port: int, out: str) -> None:
    from adapprox_cli.distributed import full_model_state_dict, shard_for_training

    _init(rank, port)
    saved = torch.load(Path(out) / "start.pt", weights_only=True)
    model = _model()
    model.load_state_dict(saved["model"])
    optimizer = Adapprox(model.named_parameters(), lr=1e-2, **ADAPTIVE)
    optimizer.load_state_dict(saved["optimizer"])
    shard_for_training(model, optimizer)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    assert set(optimizer.state) == set(model.parameters())  # the state moved to the new parameters
    _train(model, optimizer, range(3, 6), rank)
    params = full_model_state_dict(model)
    if rank == 0:
        torch.save({"params": params, "ranks": optimizer.ranks()}, Path(out) / "sharded.pt")
    dist.destroy_process_group()


def test_a_one_process_run_continues_sharded(tmp_path):
    model = _model()
    optimizer = Adapprox(model.named_parameters(), lr=1e-2, **ADAPTIVE)
    _train(model, optimizer, range(3))
    start = copy.deepcopy(model.state_dict())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "start.pt")
    _launch(_shard_worker, str(tmp_path))
    _train(model, optimizer, range(3, 6))
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    assert sharded["ranks"] == optimizer.ranks()
    _assert_close(sharded["params"], model.state_dict(), 1e-3, start)


def _train_worker(rank: int, port: int, second_port: int, checkpoint: str, out: str) -> None:
    import os

    from adapprox_cli.train.loop import TrainConfig, train

    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # The sharded step runs the per-step rank rule; the DDP reference is made to run it too.
    original_load = Adapprox.load_state_dict

    def load_with_step_rule(self, state_dict):
        original_load(self, state_dict)
        for group in self.param_groups:
            group["rank_rule"] = "step"

    Adapprox.load_state_dict = load_with_step_rule
    results = {}
    for fsdp, master_port in ((True, port), (False, second_port)):
        os.environ["MASTER_PORT"] = str(master_port)
        run = "fsdp" if fsdp else "ddp"
        config = TrainConfig(
            checkpoint=Path(checkpoint),
            steps=3,
            device="cpu",
            eval_iters=2,
            out_dir=Path(out) / run,
            handle_signals=False,
            fsdp=fsdp,
        )
        result = train(config)
        results[run] = {"losses": [h["loss"] for h in result.history], "ranks": result.ranks}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_train_fsdp_matches_ddp_and_writes_a_one_process_checkpoint(tmp_path):
    from test_train import make_train_checkpoint

    checkpoint = make_train_checkpoint(tmp_path / "source", dropout=0.0)
    _launch(_train_worker, _free_port(), str(checkpoint), str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert results[0]["fsdp"]["ranks"] == results[0]["ddp"]["ranks"]
    for a, b in zip(results[0]["fsdp"]["losses"], results[0]["ddp"]["losses"]):
        assert abs(a - b) < 1e-4 * abs(b)
    # rank 0 wrote the gathered state: plain tensors of the full shapes, as DDP writes them.
    fsdp = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    start = torch.load(checkpoint, weights_only=True)["model"]
    for key, value in ddp["model"].items():
        assert fsdp["model"][key].shape == value.shape
        # within 1e-3 of what the three steps changed (measured: 2e-5 at most)
        assert (fsdp["model"][key] - value).norm() <= 1e-3 * (value - start[key]).norm() + 1e-9, key
    for index, state in ddp["optimizer"]["state"].items():
        for key, value in state.items():
            if key != "exp_avg_sq_sketch":  # the sharded step keeps none
                assert fsdp["optimizer"]["state"][index][key].shape == value.shape, (index, key)


def test_train_fsdp_without_torchrun_is_a_one_line_error(tmp_path, monkeypatch):
    from test_train import make_train_checkpoint
    from typer.testing import CliRunner

    from adapprox_cli.cli import app

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    checkpoint = make_train_checkpoint(tmp_path / "source")
    result = CliRunner().invoke(app, ["train", str(checkpoint), "--steps", "1", "--fsdp"])
    assert result.exit_code == 2 and "torchrun --nproc-per-node 2" in result.output


def _nan_worker(rank: int, port: int, out: str) -> None:
    mesh = _init(rank, port)
    model = _sharded(mesh)
    optimizer = Adapprox(model.parameters(), lr=1e-2, **ADAPTIVE)
    _train(model, optimizer, range(2), rank)
    weight = model[0].weight
    before = {k: v.to_local().clone() for k, v in optimizer.state[weight].items() if k != "step"}
    before_weight, before_other = weight.to_local().clone(), model[2].weight.to_local().clone()
    x, y = _batch(2)
    nn.functional.mse_loss(model(x[rank * 4 : rank * 4 + 4]), y[rank * 4 : rank * 4 + 4]).backward()
    if rank == 1:
        weight.grad.to_local()[0, 0] = float("nan")  # only rank 1's shard is bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    state = optimizer.state[weight]
    torch.save(
        {
            "unchanged": all(torch.equal(state[k].to_local(), v) for k, v in before.items())
            and torch.equal(weight.to_local(), before_weight),
            "step": state["step"].item(),
            "other_moved": not torch.equal(model[2].weight.to_local(), before_other),
            "warned": any("NaN" in str(w.message) for w in caught),
        },
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_a_nan_on_one_rank_skips_the_parameter_on_every_rank(tmp_path):
    _launch(_nan_worker, str(tmp_path))
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result == {"unchanged": True, "step": 2.0, "other_moved": True, "warned": True}, rank
