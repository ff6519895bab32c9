"""controldiff: composable controlled generation for Stable Diffusion-family models."""
