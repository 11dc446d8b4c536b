"""Model families, the latent diffusion model, loading from every kind of source, and the zoo."""
