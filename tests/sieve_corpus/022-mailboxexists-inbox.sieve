# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "mailbox"];
if mailboxexists "INBOX" {
  fileinto "yes";
} else {
  fileinto "no";
}
