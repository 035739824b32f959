"""POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595) and SASL PLAIN (RFC 5034).

`server.POP3Factory` is the listener's factory; `maildrop.Maildrop` is the
POP3 avatar (a twisted.mail.pop3.IMailbox over the user's INBOX IFolder) that
mailgw.realm hands out.
"""
