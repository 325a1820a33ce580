"""The Lightning application around the model in `moe/`: module, data, callbacks, strategy, tracking."""
