"""The engine's version, below every other module: the package's __init__ re-exports it, and a module the
__init__ imports (merge.py, which writes it into each lineage record) takes it from here, not from the __init__."""

__version__ = "0.1.0"
