# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "regex"];
if header :regex "subject" "^report" {
  fileinto "yes";
} else {
  fileinto "no";
}
