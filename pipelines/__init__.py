"""vaeflow's pipeline: orchestration, tracking, validation and storage around `vae_models`."""
