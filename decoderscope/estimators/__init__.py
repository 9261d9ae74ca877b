"""Critics, their training loop, and the exact latent values."""
