"""DPA in PyTorch: model, data, losses, training loop and DAVIS evaluation (SPEC §2–3)."""
