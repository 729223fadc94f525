"""Data: read, clean, split and tokenize the records."""
