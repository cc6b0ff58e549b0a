"""Media helpers both the gateway and the engine use, with no torch or transformers import."""
