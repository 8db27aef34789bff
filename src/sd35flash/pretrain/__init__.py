"""Pretraining the toy teacher on the shapes world: a VAE, then an SD3 transformer with rectified flow."""
