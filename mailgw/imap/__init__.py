"""IMAP4rev1 (RFC 3501) on the shared mailbox store.

    server.py    the session on mailgw.session.core: literal framing, IDLE, login, the command table
    mailboxes.py the authenticated-state commands (SELECT, LIST, STATUS, APPEND, QUOTA, ...)
    selected.py  the selected-state commands (FETCH, SEARCH, STORE, COPY, MOVE, EXPUNGE, ...)
    replies.py   the session states and command results (OK, NO, BAD)
    parser.py    command arguments: atoms, strings, literals, sequence sets, flags, dates
    fetch.py     FETCH attributes: parsing and rendering
    search.py    SEARCH: parsing keys into a tree and evaluating it in one pass
    message.py   headers, MIME structure, ENVELOPE/BODYSTRUCTURE, the parsed-message cache
    mailbox.py   the IAccount avatar and the per-session view of a selected folder
    wire.py      response formatting: quoted strings, literals, lists, mailbox names
"""
