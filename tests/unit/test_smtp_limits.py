"""Every SMTP limit is explicit, configurable, and answered with the right code."""
from __future__ import annotations


from smtp_harness import Session, make_config
from test_smtp_security import start_data


def test_size_announced_and_checked_at_mail_rfc1870():
    s = Session(smtp={"max_message_size": 5000})
    assert "250-SIZE 5000" in s.ehlo()
    assert s.last("MAIL FROM:<a@x.test> SIZE=5001") == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert s.last("MAIL FROM:<a@x.test> SIZE=5000") == "250 2.1.0 Ok"


def test_size_checked_after_data():
    s = Session(smtp={"max_message_size": 5000})
    start_data(s)
    assert s.send(b"A" * 900 + b"\r\n") == []
    assert s.send((b"B" * 900 + b"\r\n") * 5 + b".\r\n") == \
        ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert s.store.delivered == []


def test_recipient_limit_gives_452_rfc5321_4_5_3_1_10():
    s = Session(smtp={"max_recipients": 100}, client="10.0.0.1")
    s.ehlo()
    s.last("MAIL FROM:<a@x.test>")
    for n in range(100):
        assert s.last(f"RCPT TO:<r{n}@elsewhere.test>") == "250 2.1.5 Ok"
    assert s.last("RCPT TO:<one-more@elsewhere.test>") == "452 4.5.3 Too many recipients"
    assert s.last("DATA").startswith("354")


def test_error_limit_closes_with_421():
    s = Session(smtp={"max_errors": 3})
    s.ehlo()
    assert s.last("FROB") .startswith("500")
    assert s.last("FROB").startswith("500")
    assert s.cmd("FROB") == ["500 5.5.2 Syntax error, command unrecognized",
                             "421 4.7.0 Too many errors, closing transmission channel"]
    assert s.closed


def test_commands_before_mail_limit():
    s = Session(smtp={"max_commands_before_mail": 5})
    for _ in range(5):
        assert s.last("NOOP") == "250 2.0.0 Ok"
    assert s.last("NOOP") == "421 4.7.0 Too many commands without a transaction"
    assert s.closed


def test_connection_limit_per_client_address():
    first = Session(smtp={"max_connections_per_ip": 2, "max_connections": 10})
    factory, clock = first.factory, first.clock
    second = Session(factory=factory, clock=clock)
    third = Session(factory=factory, clock=clock)
    assert third.read() == ["421 4.7.0 Too many connections, try again later"] and third.closed
    other = Session(factory=factory, clock=clock, client="192.0.2.200")
    assert other.read()[0].startswith("220 ")
    # A closed session frees its slot.
    second.server.connectionLost(None)
    fourth = Session(factory=factory, clock=clock)
    assert fourth.read()[0].startswith("220 ")


def test_connection_limit_in_total():
    first = Session(smtp={"max_connections": 2, "max_connections_per_ip": 2})
    Session(factory=first.factory, clock=first.clock, client="192.0.2.2")
    third = Session(factory=first.factory, clock=first.clock, client="192.0.2.3")
    assert third.read() == ["421 4.7.0 Too many connections, try again later"]


def test_idle_command_timeout():
    s = Session(smtp={"command_timeout": 60})
    s.clock.advance(59)
    assert not s.closed
    s.cmd("NOOP")
    s.clock.advance(59)
    assert not s.closed
    s.clock.advance(2)
    assert s.read() == ["421 4.4.2 Timeout, closing transmission channel"] and s.closed


def test_data_timeout_applies_inside_data():
    s = Session(smtp={"command_timeout": 600, "data_timeout": 30})
    start_data(s)
    s.clock.advance(31)
    assert s.read() == ["421 4.4.2 Timeout, closing transmission channel"]


def test_total_session_time_bounds_a_trickling_client():
    s = Session(smtp={"command_timeout": 10, "session_timeout": 100})
    for _ in range(20):
        s.send(b"N")           # one byte at a time keeps the idle timer happy...
        s.clock.advance(5)
    assert s.read() == ["421 4.4.2 Session time limit exceeded"] and s.closed


def test_limits_come_from_config():
    config = make_config(smtp={"max_recipients": 250, "max_message_size": 2048})
    s = Session(config=config)
    assert s.server.limits.max_recipients == 250
    assert "250-SIZE 2048" in s.ehlo()


def test_trusted_networks_are_exempt_from_the_per_client_limit_not_the_total():
    first = Session(client="10.0.0.7", smtp={"max_connections_per_ip": 1, "max_connections": 3})
    second = Session(factory=first.factory, clock=first.clock, client="10.0.0.7")
    assert second.read()[0].startswith("220 ")
    third = Session(factory=first.factory, clock=first.clock, client="10.0.0.7")
    assert third.read()[0].startswith("220 ")
    fourth = Session(factory=first.factory, clock=first.clock, client="10.0.0.7")
    assert fourth.read() == ["421 4.7.0 Too many connections, try again later"]
