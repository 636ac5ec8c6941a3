"""Editing and personalisation: SDEdit, inpainting, dual guidance, Prompt-to-Prompt,
textual inversion. Wrappers of model_fn and grids, so every sampler gets them."""
