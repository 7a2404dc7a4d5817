"""Encoders turn text into vectors."""
