"""Run directories and what is written into them."""
