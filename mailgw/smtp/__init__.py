"""SMTP server: protocol, reply codes, per-recipient policy."""
