"""Checkpoints written by the real libraries (skipped when the library is not installed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapprox_cli.checkpoints import load_checkpoint


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_transformers_trainer_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        save_steps=3,
        use_cpu=True,
        report_to=[],
        weight_decay=0.01,
        per_device_train_batch_size=4,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    ck = load_checkpoint(tmp_path / "checkpoint-3")
    decay = set(trainer.get_decay_parameter_names(model))
    named = dict(model.named_parameters())
    expected = [n for n in named if n in decay] + [n for n in named if n not in decay]
    assert ck.format == "hf-trainer" and ck.step == 3
    assert [p.name for p in ck.params] == expected
    assert all(p.shape == tuple(named[p.name].shape) for p in ck.params)


def test_lightning_checkpoint(tmp_path):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    module = Module()
    trainer = lightning.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ck = load_checkpoint(tmp_path / "m.ckpt")
    assert ck.format == "lightning" and ck.step == 3
    assert [p.name for p in ck.params] == [n for n, _ in module.named_parameters()]


def test_accelerate_save_state(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(model(torch.randn(2, 4)).square().sum())
    optimizer.step()
    accelerator.save_state(str(tmp_path / "state"))
    ck = load_checkpoint(tmp_path / "state")
    assert ck.format == "accelerate"
    assert [p.name for p in ck.params] == [n for n, _ in model.named_parameters()]
