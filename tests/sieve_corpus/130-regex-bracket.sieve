# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "regex"];
if header :regex "x-spam-score" "^[0-9]+$" {
  fileinto "yes";
} else {
  fileinto "no";
}
