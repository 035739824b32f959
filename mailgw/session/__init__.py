"""The connection core under every protocol (SMTP, POP3, IMAP).

`core.LineSession` owns a connection: input framing, one command at a time
with replies in order, flow control both ways, timers, STARTTLS, max_errors,
closing, and the one place where errors become replies. A protocol adds its
command table (`core.CommandTable`), its reply formatting and its hooks.
`listener.ListenerFactory` is every listener's factory base (connection
limits, the sessions for shutdown); `info.SessionInfo` is the cred `mind`.
"""
