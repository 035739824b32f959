"""Where an address leads: the recipient-resolution stage (docs/routing.md)."""
