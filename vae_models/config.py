"""Hyper-parameters of the VAE itself (network, objective, optimiser)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class VAEConfig(BaseModel):
    """Network and objective of one tabular VAE; stored beside its weights."""

    model_config = ConfigDict(extra="forbid")

    latent_dim: int = Field(8, ge=1, description="size of z")
    hidden_dims: list[int] = Field(default_factory=lambda: [128, 128], min_length=1)
    architecture: Literal["mlp", "conv"] = Field(
        "mlp", description="mlp for tables; conv reads the numeric columns as one image of image_shape"
    )
    image_shape: tuple[int, int] | None = Field(None, description="(height, width) for architecture=conv")
    conv_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    beta: float = Field(1.0, gt=0.0, description="weight of the KL term (beta-VAE)")
    n_importance: PositiveInt | Literal["auto"] = Field(
        1,
        description="K samples per row in training; K>1 trains the IWAE/MIWAE bound (better imputation, "
        "worse anomaly ranking); auto: K from the fit's budget (vae_models.data.training_samples), 1 for "
        "a network built without one",
    )
    kl_warmup: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of the training steps over which the KL weight ramps to beta"
    )
    linear_skip: bool = Field(
        True,
        description="add a linear path from z beside the decoder's MLP: the model then contains "
        "probabilistic PCA, and near-linear tables need no depth",
    )
    num_logvar_min: list[float | None] | None = Field(
        None,
        description="per numeric column log-variance floor, set from the schema at fit time: a column "
        "quantised to steps of s (integers, pixels) gets log(s^2/12) in standardised units; None = "
        "logvar_min",
    )
    encoder_hide_rate: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of observed cells hidden from the encoder in training"
    )
    trim_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="robust training: after the KL warm-up, the rows of each training batch whose loss "
        "per observed cell is above the batch's (1 - trim_fraction) quantile (linearly interpolated: "
        "ceil(trim_fraction x (B - 1)) of B rows, so at least one of any batch) are left out of the "
        "gradient, so contaminated rows (the normal case in a warehouse) shape the model less",
    )
    logvar_min: float = -8.0
    logvar_max: float = 6.0
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="learning rate over the step budget: constant, or cosine decay to 1% of it by the last step",
    )

    @model_validator(mode="after")
    def _conv_needs_a_shape(self) -> VAEConfig:
        if self.architecture == "conv" and self.image_shape is None:
            raise ValueError("model.architecture=conv needs model.image_shape, e.g. [8, 8] or [28, 28]")
        return self
