"""Prefect flows and the command-line interface: composition only."""
