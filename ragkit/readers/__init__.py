"""Readers turn retrieved hits into answers."""
