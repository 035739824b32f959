"""Recipient resolution (mailgw.routing.resolver) and the alias table
(mailgw.routing.aliases): lookup order, loops, depth, duplicates, catch-all
precedence, domain aliases, role addresses, subaddress folders, send-as."""
from __future__ import annotations

import pytest
from twisted.internet import task

from mailgw.errors import MailError
from mailgw.routing import aliases as table_module
from mailgw.routing.resolver import AliasFile, LocalTarget, RemoteTarget, Resolver, StaticAliases

LOCAL = frozenset({"example.com", "example.net"})
# example.org is never local here: tests make it a domain alias.


class Users:
    def __init__(self, *addresses):
        self.addresses_ = set(addresses)

    def exists(self, address):
        return address in self.addresses_


def table(text: str, *, max_depth=10, max_expansion=1000):
    parsed, problems = table_module.parse_aliases(text.encode(), LOCAL, max_depth=max_depth,
                                                  max_expansion=max_expansion)
    return parsed, problems


def resolver(text: str = "", users=("alice@example.com", "bob@example.com", "carol@example.com"), *,
             mail_dir=None, max_depth=10, srs=None, postmaster="postmaster@example.com",
             abuse="postmaster@example.com") -> Resolver:
    parsed, problems = table(text, max_depth=max_depth)
    assert problems == [], problems
    return Resolver(local_domains=LOCAL, postmaster=postmaster, abuse=abuse, recipient_delimiter="+",
                    users=Users(*users), aliases=StaticAliases(parsed), srs=srs, mail_dir=mail_dir,
                    max_depth=max_depth)


def mailboxes(targets):
    return [str(t) for t in targets]


# -- users, aliases, lists --------------------------------------------------------

def test_a_user_resolves_to_its_own_mailbox_case_insensitively():
    assert resolver().resolve("Alice@Example.COM") == (LocalTarget("alice@example.com"),)


def test_unknown_address_is_550_5_1_1():
    with pytest.raises(MailError) as caught:
        resolver().resolve("nobody@example.com")
    assert (caught.value.code, caught.value.enhanced) == (550, "5.1.1")


def test_other_domains_are_remote_targets_untouched():
    assert resolver().resolve("Someone@Elsewhere.example") == (RemoteTarget("Someone@Elsewhere.example"),)


def test_a_list_with_two_local_members_and_one_external():
    r = resolver("info@example.com alice@example.com, bob@example.com friend@elsewhere.example\n")
    assert r.resolve("info@example.com") == (
        LocalTarget("alice@example.com"), LocalTarget("bob@example.com"),
        RemoteTarget("friend@elsewhere.example", forwarded=True))


def test_nested_aliases_expand_and_duplicates_collapse():
    r = resolver("all@example.com team@example.com, alice@example.com\n"
                 "team@example.com alice@example.com, bob@example.com\n")
    assert r.resolve("all@example.com") == (LocalTarget("alice@example.com"), LocalTarget("bob@example.com"))


def test_an_alias_wins_over_a_user_of_the_same_name():
    # Postfix virtual(5): the alias is looked up first, so bob can forward his own mail.
    r = resolver("bob@example.com bob@example.com, bob@elsewhere.example\n")
    assert r.resolve("bob@example.com") == (LocalTarget("bob@example.com"),
                                            RemoteTarget("bob@elsewhere.example", forwarded=True))


def test_a_dangling_local_member_is_dropped_and_the_others_kept():
    r = resolver("info@example.com ghost@example.com, alice@example.com\n")
    assert r.resolve("info@example.com") == (LocalTarget("alice@example.com"),)


def test_an_alias_of_only_dangling_members_is_unknown():
    r = resolver("info@example.com ghost@example.com\n")
    with pytest.raises(MailError):
        r.resolve("info@example.com")


# -- loops and depth: table errors, never mail loops ---------------------------------

def test_a_loop_is_a_table_error_with_line_numbers_and_those_aliases_are_not_loaded():
    parsed, problems = table("a@example.com b@example.com\n"
                             "b@example.com a@example.com\n"
                             "ok@example.com alice@example.com\n")
    assert sorted(line for line, _ in problems) == [1, 2]
    assert all("alias loop" in reason for _, reason in problems)
    assert set(parsed.exact) == {"ok@example.com"}


def test_a_loop_through_a_domain_alias_is_found():
    _, problems = table("@example.org @example.com\n"
                        "x@example.com y@example.org\n"
                        "y@example.com x@example.org\n")
    assert [line for line, _ in problems] == [2, 3]


def test_an_alias_naming_itself_keeps_a_copy_and_is_not_a_loop():
    _, problems = table("bob@example.com bob@example.com, bob@elsewhere.example\n")
    assert problems == []


def test_nesting_deeper_than_the_limit_is_a_table_error():
    chain = "".join(f"a{i}@example.com a{i + 1}@example.com\n" for i in range(5)) + "a5@example.com alice@example.com\n"
    _, problems = table(chain, max_depth=3)
    assert problems and all("deeper than max_alias_depth" in reason for _, reason in problems)
    _, problems = table(chain, max_depth=6)
    assert problems == []


def test_a_run_time_loop_through_a_catch_all_is_dropped_not_followed():
    # Not visible when the table loads (it depends on which users exist):
    # x@ -> catch-all -> x@ again. The walk drops the repeat.
    r = resolver("@example.com x@example.com, alice@example.com\n")
    assert r.resolve("x@example.com") == (LocalTarget("alice@example.com"),)


def test_too_many_targets_is_refused():
    members = ", ".join(f"m{i}@elsewhere.example" for i in range(20))
    _, problems = table(f"big@example.com {members}\n", max_expansion=10)
    assert problems and "max_expansion" in problems[0][1]


# -- catch-all, domain aliases, role addresses -----------------------------------------

def test_catch_all_is_used_only_when_no_user_or_alias_matches():
    r = resolver("@example.com carol@example.com\ninfo@example.com bob@example.com\n")
    assert r.resolve("alice@example.com") == (LocalTarget("alice@example.com"),)
    assert r.resolve("info@example.com") == (LocalTarget("bob@example.com"),)
    assert r.resolve("random@example.com") == (LocalTarget("carol@example.com"),)
    # A subaddress of a user is that user, not the catch-all.
    assert r.resolve("alice+x@example.com") == (LocalTarget("alice@example.com"),)


def test_domain_alias_maps_every_address_and_makes_the_domain_ours():
    parsed, problems = table("@example.org @example.com\n")
    assert problems == []
    r = Resolver(local_domains=LOCAL, postmaster="postmaster@example.com", abuse="postmaster@example.com",
                 recipient_delimiter="+", users=Users("alice@example.com"), aliases=StaticAliases(parsed))
    assert r.is_ours("EXAMPLE.ORG") and not r.is_ours("evil-example.org")
    assert r.resolve("alice@example.org") == (LocalTarget("alice@example.com"),)
    with pytest.raises(MailError):
        r.resolve("nobody@example.org")


def test_domain_alias_target_must_be_local_and_patterns_must_be_ours():
    _, problems = table("@example.org @elsewhere.example\nx@notours.example alice@example.com\n")
    assert [line for line, _ in problems] == [1, 2]
    assert "not one of server.local_domains" in problems[0][1]


def test_postmaster_and_abuse_always_resolve_in_every_domain():
    r = resolver(users=("alice@example.com",), postmaster="alice@example.com", abuse="alice@example.com")
    for address in ("postmaster@example.com", "POSTMASTER@example.net", "abuse@example.net", "postmaster"):
        assert r.resolve(address) == (LocalTarget("alice@example.com"),), address


def test_abuse_can_go_elsewhere_and_an_alias_overrides_the_role():
    r = resolver("abuse@example.net carol@example.com\n", abuse="bob@example.com")
    assert r.resolve("abuse@example.com") == (LocalTarget("bob@example.com"),)
    assert r.resolve("abuse@example.net") == (LocalTarget("carol@example.com"),)


def test_the_postmaster_mailbox_itself_resolves_even_without_a_user():
    r = resolver(users=())
    assert r.resolve("postmaster@example.com") == (LocalTarget("postmaster@example.com"),)


# -- subaddressing (RFC 5233) -----------------------------------------------------

def make_folder(mail_dir, address, dirname):
    local, domain = address.split("@")
    (mail_dir / domain / local / dirname / "new").mkdir(parents=True)


def test_subaddress_files_into_an_existing_folder(tmp_path):
    make_folder(tmp_path, "alice@example.com", ".Lists")
    r = resolver(mail_dir=tmp_path)
    assert r.resolve("alice+Lists@example.com") == (LocalTarget("alice@example.com", "Lists"),)
    # Case-insensitive match on the folder name, as the tag may be lower-cased on the way.
    assert r.resolve("alice+lists@example.com") == (LocalTarget("alice@example.com", "Lists"),)


def test_subaddress_without_such_folder_goes_to_inbox(tmp_path):
    r = resolver(mail_dir=tmp_path)
    assert r.resolve("alice+nothere@example.com") == (LocalTarget("alice@example.com"),)
    assert r.resolve("alice+../../bob@example.com") == (LocalTarget("alice@example.com"),)


def test_subaddress_of_an_alias_expands_the_alias():
    r = resolver("info@example.com bob@example.com\n")
    assert r.resolve("info+ads@example.com") == (LocalTarget("bob@example.com"),)


def test_alias_target_with_a_tag_files_into_the_folder(tmp_path):
    make_folder(tmp_path, "alice@example.com", ".Lists")
    r = resolver("news@example.com alice+Lists@example.com\n", mail_dir=tmp_path)
    assert r.resolve("news@example.com") == (LocalTarget("alice@example.com", "Lists"),)


def test_delimiter_off_means_no_subaddresses():
    parsed, _ = table("")
    r = Resolver(local_domains=LOCAL, postmaster="postmaster@example.com", abuse="postmaster@example.com",
                 recipient_delimiter="", users=Users("alice@example.com"), aliases=StaticAliases(parsed))
    with pytest.raises(MailError):
        r.resolve("alice+x@example.com")


# -- who may send as what -----------------------------------------------------------

def test_owns_own_address_subaddress_domain_alias_and_send_as_aliases():
    r = resolver("@example.org @example.com\n"
                 "sales@example.com alice@example.com, bob@example.com [send-as]\n"
                 "info@example.com alice@example.com\n"
                 "@example.net alice@example.com\n")
    assert r.owns("alice@example.com", "Alice@example.com")
    assert r.owns("alice@example.com", "alice+x@example.com")
    assert r.owns("alice@example.com", "alice@example.org")
    assert r.owns("alice@example.com", "sales@example.com")
    assert r.owns("bob@example.com", "sales@example.com")
    assert not r.owns("carol@example.com", "sales@example.com")
    assert not r.owns("alice@example.com", "info@example.com")          # member, but not [send-as]
    assert not r.owns("alice@example.com", "anything@example.net")      # catch-all target is not an owner
    assert not r.owns("alice@example.com", "bob@example.com")


# -- the alias file: reload on change, bad lines --------------------------------------

def test_alias_file_reloads_after_a_change_and_reports_bad_lines(tmp_path):
    clock = task.Clock()
    path = tmp_path / "aliases"
    path.write_text("info@example.com alice@example.com\nnot an alias line\n")
    aliases = AliasFile(path, LOCAL, clock=clock, check_interval=1.0)
    assert set(aliases.table().exact) == {"info@example.com"}
    path.write_text("help@example.com bob@example.com\n")
    assert set(aliases.table().exact) == {"info@example.com"}         # not checked again yet
    clock.advance(1.0)
    assert set(aliases.table().exact) == {"help@example.com"}
    path.unlink()
    clock.advance(1.0)
    assert aliases.table().exact == {}


def test_parse_line_problems_are_specific():
    for line, words in [("a@example.com", "at least one target"),
                        ("a@example.com @example.net", "only target of a @domain pattern"),
                        ("@example.org @example.org", "to itself"),
                        ("a@b@example.com x@example.com", "more than one '@'")]:
        with pytest.raises(ValueError) as caught:
            table_module.parse_line(line)
        assert words in str(caught.value), line


def test_format_and_parse_round_trip():
    parsed, _ = table("sales@example.com alice@example.com bob@example.com [send-as]\n"
                      "@example.org @example.com\n@example.com carol@example.com\n")
    again, problems = table_module.parse_aliases(table_module.format_aliases(parsed), LOCAL,
                                                 max_depth=10, max_expansion=1000)
    assert problems == []
    shape = [(e.pattern, e.targets, e.send_as) for e in again.entries()]
    assert shape == [(e.pattern, e.targets, e.send_as) for e in parsed.entries()]
    assert ("sales@example.com", ("alice@example.com", "bob@example.com"), True) in shape
