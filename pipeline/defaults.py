"""Constants shared by the build and the trainer (one home for each)."""

from __future__ import annotations

#: REPA's SD-VAE latent scale (``AutoencoderKL.config.scaling_factor`` of sd-vae-ft-*)
SD_VAE_SCALE = 0.18215
#: the VAE REPA trains with (iREPA's release uses stabilityai/sd-vae-ft-mse)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
#: the encoder a build runs when none is named (REPA's headline encoder)
DEFAULT_ENCODER = "dinov2-vit-b"
#: how a store built from the bundled sample photos names its data source
BUNDLED = "<bundled sample images>"
