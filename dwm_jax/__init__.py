"""dwm_jax: masked-prediction audio SSL in JAX/Flax with dispersion-weighted masking."""

__version__ = "0.1.0"
