"""The queue's notices go through recipient resolution too: a forward that
fails bounces to the original sender (through its SRS address), never to
the alias's owner; a notice to a local alias reaches its members."""
from __future__ import annotations

from mailgw.queue.model import STATUS_BOUNCED
from mailgw.routing import aliases as table_module
from mailgw.routing.resolver import Resolver, StaticAliases
from mailgw.routing.srs import SRS
from mailgw.smtp.inbound import Router
from smtp_harness import FakeUserDB
from test_runner import Rig, dsn_fields


def routed_rig(tmp_path, aliases: str = ""):
    rig = Rig(tmp_path)
    config, users = rig.config, FakeUserDB()
    parsed, problems = table_module.parse_aliases(aliases.encode(), config.local_domains,
                                                  max_depth=10, max_expansion=1000)
    assert problems == []
    srs = SRS(b"s" * 32, "example.test", clock=rig.clock.seconds)
    resolver = Resolver(local_domains=config.local_domains, postmaster=config.postmaster,
                        abuse=config.postmaster, recipient_delimiter="+", users=users,
                        aliases=StaticAliases(parsed), srs=srs, mail_dir=config.mail_dir)
    rig.runner.router = Router(config, users, resolver, srs=srs)
    return rig, srs


def test_a_failed_forward_bounces_to_the_original_sender_not_the_forwarding_user(tmp_path):
    rig, srs = routed_rig(tmp_path, "alice@example.test alice@example.test, alice@remote.test\n")
    rig.transport.script["alice@remote.test"] = [STATUS_BOUNCED]
    rig.enqueue(sender=srs.forward("carol@elsewhere.test"), recipients=("alice@remote.test",))
    rig.run()
    rig.run()
    notice = rig.transport.requests[-1]
    assert notice.sender == ""
    assert [r.address for r in notice.recipients] == ["carol@elsewhere.test"]
    assert rig.inbox("alice") == []
    assert rig.queued_ids() == []


def test_a_notice_to_a_local_alias_sender_reaches_its_members(tmp_path):
    rig, _ = routed_rig(tmp_path, "ops@example.test alice@example.test, bob@example.test\n")
    rig.transport.default = STATUS_BOUNCED
    rig.enqueue(sender="ops@example.test")
    rig.run()
    for user in ("alice", "bob"):
        (report,) = rig.inbox(user)
        _, (per_recipient,) = dsn_fields(report)
        assert per_recipient["Action"] == "failed"


def test_a_notice_to_a_forged_srs_sender_is_dropped(tmp_path):
    rig, _ = routed_rig(tmp_path)
    forged = SRS(b"x" * 32, "example.test", clock=rig.clock.seconds).forward("carol@elsewhere.test")
    rig.transport.default = STATUS_BOUNCED
    rig.enqueue(sender=forged)
    rig.run()
    rig.run()
    assert len(rig.transport.requests) == 1            # the attempt; no notice went out
    assert rig.queued_ids() == []
