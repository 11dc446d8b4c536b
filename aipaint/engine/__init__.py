"""The generation engine of latent diffusion models: one run, its modes, the loop, sampling, noise, preview."""
