"""Spam defences: DNS blocklists, the pre-greeting test, rspamd, Junk learning."""
