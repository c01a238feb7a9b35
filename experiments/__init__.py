"""Research: each script answers one question about the model or the worker; README.md indexes them."""
