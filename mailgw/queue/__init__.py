"""Relay queue: durable spool, scheduler (runner + pure policy), outbound client, DSNs, admin."""
