"""mailgw: a mail gateway on Twisted."""
