"""Relay queue: durable spool (the scheduler and outbound client come with issue 3)."""
