"""Peer servers that tests run as real processes."""
