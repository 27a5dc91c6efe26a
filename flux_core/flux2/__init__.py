"""FLUX.2: the transformer, its autoencoder, text conditioning and sampling (black-forest-labs/flux2)."""
