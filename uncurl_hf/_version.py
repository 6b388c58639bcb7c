__version__ = "0.1.0"  # keep in sync with pyproject.toml
