"""Toy worlds with verifiable answers for end-to-end runs on a CPU."""
