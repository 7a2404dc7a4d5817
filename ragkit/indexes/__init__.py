"""Search structures over the rows of a generation's chunk table."""
