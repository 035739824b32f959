"""Users, credentials checkers and the twisted.cred realm."""
