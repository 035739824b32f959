# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "regex", "variables"];
if address :regex :localpart "to" "^([a-z]+)\\+(.*)$" {
  fileinto "${0}-${1}-${2}";
}
