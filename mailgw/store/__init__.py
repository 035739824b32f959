"""Mailbox store: Maildir per user."""
