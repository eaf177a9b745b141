"""The Lightning training module around `TabularVAE` (imported only where training happens)."""

from __future__ import annotations

import lightning as L
import torch

from vae_models.config import VAEConfig
from vae_models.vae import TableBatch, TabularVAE


class VAEModule(L.LightningModule):
    """Lightning wrapper: KL warm-up, NaN guard, per-epoch metrics, Adam."""

    def __init__(self, n_num: int, cat_sizes: list[int], config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.config = VAEConfig(**config)
        self.vae = TabularVAE(n_num, cat_sizes, self.config)
        self._train_sums: torch.Tensor | None = None  # (loss * rows, kl * rows, rows) this epoch

    def kl_weight(self) -> float:
        warmup = self.config.kl_warmup_epochs
        if warmup == 0 or not self.training or self._trainer is None:
            return self.config.beta
        steps_per_epoch = max(int(self.trainer.num_training_batches), 1)
        return self.config.beta * min(1.0, self.global_step / (warmup * steps_per_epoch))

    def training_step(self, batch, batch_idx):
        out = self.vae.loss(
            TableBatch(*batch), kl_weight=self.kl_weight(), hide=self.config.encoder_hide_rate
        )
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"training loss became {out.loss.item()} at epoch {self.current_epoch}, batch "
                f"{batch_idx}; lower model.learning_rate, raise train.gradient_clip_val or check "
                f"the input for extreme values"
            )
        # epoch means summed here and logged once, on the epoch's last batch: each `self.log`
        # call goes through Lightning's result collection, which costs a small model ~10% per step
        n = batch[0].shape[0]
        if batch_idx == 0 or self._train_sums is None:
            self._train_sums = out.loss.new_zeros(3)
        self._train_sums.add_(
            torch.stack([out.loss.detach() * n, out.kl.detach().mean() * n, out.loss.new_tensor(n)])
        )
        if self._trainer is not None and batch_idx + 1 >= self.trainer.num_training_batches:
            loss_sum, kl_sum, rows = self._train_sums
            self.log("train_loss", loss_sum / rows, on_step=False, on_epoch=True, prog_bar=True)
            self.log("train_kl", kl_sum / rows, on_step=False, on_epoch=True)
        return out.loss

    def validation_step(self, batch, batch_idx):
        out = self.vae.loss(TableBatch(*batch), kl_weight=self.config.beta)
        n = batch[0].shape[0]
        self.log("val_loss", out.loss, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val_bound", out.bound.mean(), on_epoch=True, batch_size=n)
        self.log("val_recon", out.recon.mean(), on_epoch=True, batch_size=n)
        self.log("val_kl", out.kl.mean(), on_epoch=True, batch_size=n)

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
