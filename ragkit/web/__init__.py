"""The web page of `ragkit serve` (see app.py)."""
