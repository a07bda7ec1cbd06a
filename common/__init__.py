"""Helpers every layer may import; nothing here imports the rest of the project."""
