"""desctune: fine-tune a small chat LLM to write product descriptions from product titles."""

__version__ = "0.1.0"
