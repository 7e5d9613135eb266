"""Local model recipes that need no hub download (see tiny.py)."""
