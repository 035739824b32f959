"""Mail authentication: DKIM signing, SPF/DKIM/DMARC/ARC checks, the DNS doctor."""
