"""Ingestion: find files under a folder, parse them into text with structure, cut them into chunks."""
