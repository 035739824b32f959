# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "regex", "variables"];
if header :regex "subject" "^([A-Za-z]+) ([a-z]+) \\[([a-z]+)\\]" {
  fileinto "${1}.${2}.${3}";
}
