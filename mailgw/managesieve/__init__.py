"""ManageSieve (RFC 5804): remote management of the users' Sieve scripts."""
