"""IMAP4rev1 (RFC 3501) on the shared mailbox store.

    server.py    the protocol: framing, states, commands, replies (IMAPFactory, IMAPServer)
    parser.py    command arguments: atoms, strings, literals, sequence sets, flags, dates
    fetch.py     FETCH attributes: parsing and rendering
    search.py    SEARCH: parsing keys into a tree and evaluating it in one pass
    message.py   headers, MIME structure, ENVELOPE/BODYSTRUCTURE, the parsed-message cache
    mailbox.py   the IAccount avatar and the per-session view of a selected folder
    wire.py      response formatting: quoted strings, literals, lists, mailbox names
"""
