"""The unified MoT model, its config presets and autoencoders."""
from unigrpo_jax.models.config import PRESETS, ModelConfig, get_preset
from unigrpo_jax.models.image import Autoencoder, PatchAutoencoder
from unigrpo_jax.models.unified import KVCache, ModelOutput, UnifiedModel, count_params

__all__ = ["PRESETS", "ModelConfig", "get_preset", "Autoencoder", "PatchAutoencoder", "KVCache",
           "ModelOutput", "UnifiedModel", "count_params"]
